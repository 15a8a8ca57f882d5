//! The Device Shadow side of the `aws-iot` profile (docs/PROTOCOL.md §7.3), sans-IO:
//! shadow documents, which keys go in which update, what a rejection means, and how a delta
//! becomes a desired document. The session driver only publishes and routes responses.
//!
//! From the AWS IoT developer guide: "Device Shadow MQTT topics"
//! (<https://docs.aws.amazon.com/iot/latest/developerguide/device-shadow-mqtt.html>),
//! "Device Shadow service documents"
//! (<https://docs.aws.amazon.com/iot/latest/developerguide/device-shadow-document.html>) and
//! "Device Shadow error messages"
//! (<https://docs.aws.amazon.com/iot/latest/developerguide/device-shadow-error-messages.html>):
//! 8 KB of `desired` + `reported` state per shadow, at most 6 levels of nesting, client
//! tokens of at most 64 bytes, 429 beyond 10 requests in flight on a connection.
//!
//! # Reported: durable and coalesced
//! The store keeps each key's latest value with its seq; a [`Reporter`] per shadow keeps a
//! watermark (persisted in `crate::store::shadow`): keys whose latest seq is above it are
//! dirty. One update is in flight per shadow: the dirty keys in seq order, as many as fit
//! in 8 KB; its `/update/accepted` (matched by `clientToken`) raises the watermark to the
//! update's highest seq, so every value reaches the shadow at least once, the latest one
//! last, also across restarts, and values changed meanwhile go in the next update. A
//! rejection 400 or 413 is permanent: an update of several keys is split into updates of
//! one key until past it, and a one-key update so rejected drops the key (counted, logged).
//! 409, 429, 5xx, other codes and no answer within [`RESPONSE_TIMEOUT`] are retried with
//! the reconnect backoff.
//!
//! # The device twin (`azure-iot-hub` profile)
//! Azure IoT Hub's device twin is the same idea, spoken in another [`Dialect`]: one document,
//! the reported patch is the bare `reported` object with the request id in the topic, its
//! answer a status in the topic (204 accepted). From "Understand and use device twins in IoT
//! Hub" (<https://learn.microsoft.com/azure/iot-hub/iot-hub-devguide-device-twins>): 32 KB of
//! reported properties, objects at most 10 deep, property names of at most 1 KB without
//! `.`, `$`, space or control characters (C0, C1), strings of at most 4 KB, integers within
//! ±2^52; and "Communicate with an IoT hub using the MQTT protocol"
//! (<https://learn.microsoft.com/azure/iot/iot-mqtt-connect-to-iot-hub>): 204 for a patch,
//! 200 with the twin for a GET, 400 for a malformed patch, 429 throttled, 5xx server errors;
//! desired patches carry `$version` and `null` for a removed property, and IoT Hub keeps no
//! notification for a disconnected device: after each connect the device GETs the twin and
//! ignores patches at or below its `desired.$version` ([`admit`], [`reconcile`]).

use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use super::backoff::Backoff;

/// Most bytes of state in one shadow (`desired` + `reported`).
pub const STATE_MAX: usize = 8192;
/// Deepest nesting of a shadow document: the `state` object is 1, `reported` 2.
pub const DEPTH_MAX: usize = 6;
/// An update not answered within this is sent again.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// Most updates in flight per thing across all its shadows. The Device Shadow service takes
/// 10 requests in flight per thing and answers 429 beyond them
/// (<https://docs.aws.amazon.com/general/latest/gr/iot-core.html>, "Device Shadow error
/// messages"); two are left for the `/get` and the apply result.
pub const IN_FLIGHT_MAX: usize = 8;
/// Room for `{"reported":{}}` and the per-key estimate's slack.
const STATE_SLACK: usize = 64;

/// Most bytes of a twin's reported properties.
pub const TWIN_STATE_MAX: usize = 32 * 1024;
/// Deepest nesting of the twin's reported properties, the `reported` object being 1.
pub const TWIN_DEPTH_MAX: usize = 10;
/// Longest twin property name, in bytes.
pub const TWIN_NAME_MAX: usize = 1024;
/// Longest twin string value, in bytes.
pub const TWIN_STRING_MAX: usize = 4096;
/// Twin integers are within ±2^52.
const TWIN_INT_MAX: i64 = (1 << 52) - 1;
/// The twin's name for its watermark in the store (not an AWS shadow name).
pub const TWIN: &str = "$twin";

/// How a cloud's state document is spoken: the profile chooses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dialect {
    /// AWS IoT Device Shadow (`aws-iot`).
    #[default]
    Shadow,
    /// Azure IoT Hub device twin (`azure-iot-hub`).
    Twin,
}

impl Dialect {
    /// Most bytes of reported state in one document.
    pub fn state_max(self) -> usize {
        match self {
            Dialect::Shadow => STATE_MAX,
            Dialect::Twin => TWIN_STATE_MAX,
        }
    }

    /// Most bytes of an apply result: a share of the state, the rest left to the values.
    pub fn result_max(self) -> usize {
        match self {
            Dialect::Shadow => RESULT_MAX,
            // Also within one twin string (an error text).
            Dialect::Twin => TWIN_STRING_MAX,
        }
    }

    /// What logs and figures call the document.
    pub fn what(self) -> &'static str {
        match self {
            Dialect::Shadow => "shadow",
            Dialect::Twin => "twin",
        }
    }

    /// An update of `reported` with request id `token`.
    fn update(self, reported: &Value, token: &str) -> Vec<u8> {
        match self {
            Dialect::Shadow => {
                format!(r#"{{"state":{{"reported":{reported}}},"clientToken":"{token}"}}"#)
                    .into_bytes()
            }
            Dialect::Twin => reported.to_string().into_bytes(),
        }
    }

    /// A rejection that will not pass however often it is sent again. The twin's MQTT
    /// page lists 400 for a patch it cannot take, but a reported section over 32 KB has
    /// been answered 403 (errorCode 403100, <https://github.com/Azure/iotedge/issues/7035>):
    /// every 4xx but 429 (throttled) is taken as permanent.
    pub fn permanent(self, code: u64) -> bool {
        match self {
            Dialect::Shadow => permanent(code),
            Dialect::Twin => (400..500).contains(&code) && code != 429,
        }
    }

    /// The body of a read with request id `token` (the twin's is in the topic).
    pub fn get_body(self, token: &str) -> Vec<u8> {
        match self {
            Dialect::Shadow => format!(r#"{{"clientToken":"{token}"}}"#).into_bytes(),
            Dialect::Twin => Vec::new(),
        }
    }
}

/// Why `value` cannot be a twin property (a name, string or integer out of the twin's
/// rules; [`TWIN_DEPTH_MAX`] is checked by [`insert`]).
#[inline(never)]
fn twin_check(value: &Value) -> Result<(), String> {
    let mut stack = vec![value];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    twin_name(k)?;
                    stack.push(v);
                }
            }
            Value::Array(items) => stack.extend(items),
            Value::String(s) if s.len() > TWIN_STRING_MAX => {
                return Err(format!(
                    "a string is longer than the twin's {TWIN_STRING_MAX} bytes"
                ));
            }
            Value::Number(n)
                if n.as_i64().map_or(n.is_u64(), |i| {
                    !(-TWIN_INT_MAX - 1..=TWIN_INT_MAX).contains(&i)
                }) =>
            {
                return Err(format!("the integer {n} is beyond the twin's ±2^52"));
            }
            _ => {}
        }
    }
    Ok(())
}

/// A twin property name: 1-1024 bytes, none of `.`, `$`, space, control characters.
fn twin_name(name: &str) -> Result<(), String> {
    let bad = name
        .chars()
        .find(|c| matches!(c, '.' | '$' | ' ') || c.is_control());
    if name.is_empty() || name.len() > TWIN_NAME_MAX || bad.is_some() {
        return Err(format!(
            "the property name {:?} is not a twin's (1-{TWIN_NAME_MAX} bytes without '.', '$', \
             space or control characters)",
            crate::model::text::shorten(name)
        ));
    }
    Ok(())
}

/// `key` set to `value` in `reported`: split at dots into nested objects when `nested`, at
/// most as deep as the shadow allows (the rest of the key stays dotted in the innermost
/// member). `Err` when the value alone nests too deep. A later key replaces an earlier
/// value on its path, as the shadow's own merge does.
#[cfg(test)]
fn insert(
    reported: &mut Map<String, Value>,
    key: &str,
    value: Value,
    nested: bool,
) -> Result<(), String> {
    insert_in(Dialect::Shadow, reported, key, value, nested)
}

/// [`insert`] in `dialect`: the twin always nests, and checks its rules, so a key whose
/// dots cannot all become objects (too deep) or a value out of its rules is refused.
#[inline(never)]
fn insert_in(
    dialect: Dialect,
    reported: &mut Map<String, Value>,
    key: &str,
    value: Value,
    nested: bool,
) -> Result<(), String> {
    let (max, above) = match dialect {
        Dialect::Shadow => (DEPTH_MAX, DEPTH_MAX - 1),
        Dialect::Twin => (TWIN_DEPTH_MAX, TWIN_DEPTH_MAX),
    };
    let room = above.checked_sub(crate::model::rules::depth(&value));
    let twin = dialect == Dialect::Twin;
    let levels = match room {
        Some(r) if r >= 1 && (!twin || key.split('.').count() <= r) => {
            if nested || twin {
                r
            } else {
                1
            }
        }
        _ if twin => {
            return Err(format!(
                "its key and value nest deeper than the twin's {max} levels"
            ));
        }
        _ => {
            return Err(format!(
                "its value nests deeper than the shadow's {max} levels"
            ));
        }
    };
    if twin {
        key.split('.').try_for_each(twin_name)?;
        twin_check(&value)?;
    }
    let mut parts = key.splitn(levels, '.');
    let mut map = reported;
    let mut part = parts.next().unwrap_or(key);
    for next in parts {
        let slot = map
            .entry(part.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        if !slot.is_object() {
            *slot = Value::Object(Map::new());
        }
        let Value::Object(m) = slot else {
            return Err("internal: not an object".into());
        };
        map = m;
        part = next;
    }
    map.insert(part.to_owned(), value);
    Ok(())
}

/// An upper bound of what `key` = `value` adds to a state document (each path segment as
/// if not shared).
fn cost(key: &str, value: &Value) -> usize {
    let v = value.to_string().len();
    v + key.len() + 6 * key.split('.').count()
}

/// Dotted keys of a shadow state object: nested objects flattened when `nested`; members
/// whose name starts with `$` left out when `meta` (the twin's `$version`, `$metadata`).
pub fn flatten(
    state: &Map<String, Value>,
    nested: bool,
    meta: bool,
    prefix: &str,
    out: &mut Map<String, Value>,
) {
    for (k, v) in state {
        if meta && k.starts_with('$') {
            continue;
        }
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            Value::Object(m) if nested && !m.is_empty() => flatten(m, nested, meta, &key, out),
            v => {
                out.insert(key, v.clone());
            }
        }
    }
}

/// What a delta or a `/get/accepted` asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Desired {
    /// A desired document (docs/PROTOCOL.md §5.2) for the pipeline.
    Apply(Value),
    /// Publish `/get`: the delta does not hold whole values (an object, with `nested` off).
    Get,
    /// Nothing to apply (no delta, or not a shadow document).
    Nothing,
}

/// A message of `/update/delta` (`from_get`: of `/get/accepted`) as a desired document:
/// `version` is the shadow's version, `state` the delta's keys (flattened to dotted keys
/// when `nested`; else each top-level key with its whole desired value, which only
/// `/get/accepted` has), `ts` the message's `timestamp` (seconds) in ms.
#[inline(never)]
pub fn desired(payload: &[u8], from_get: bool, nested: bool) -> Desired {
    let Value::Object(body) = parse(payload) else {
        return Desired::Nothing;
    };
    let Some(version) = body.get("version").and_then(Value::as_u64) else {
        return Desired::Nothing;
    };
    let state = body.get("state");
    let (delta, whole) = if from_get {
        (
            state.and_then(|s| s.get("delta")),
            state.and_then(|s| s.get("desired")),
        )
    } else {
        (state, None)
    };
    let Some(Value::Object(delta)) = delta else {
        return Desired::Nothing;
    };
    let mut keys = Map::new();
    if nested {
        flatten(delta, true, false, "", &mut keys);
    } else {
        for (k, v) in delta {
            let v = whole.and_then(|w| w.get(k)).unwrap_or(v);
            if v.is_object() && !from_get {
                return Desired::Get;
            }
            keys.insert(k.clone(), v.clone());
        }
    }
    if keys.is_empty() {
        return Desired::Nothing;
    }
    let mut doc = Map::new();
    doc.insert("version".into(), Value::from(version));
    doc.insert("state".into(), Value::Object(keys));
    if let Some(t) = body.get("timestamp").and_then(Value::as_u64) {
        doc.insert("ts".into(), Value::from(t.saturating_mul(1000)));
    }
    Desired::Apply(Value::Object(doc))
}

/// A twin's desired patch (`from_get`: the `desired` of the GET answer) as a desired
/// document: `version` its `$version` (`topic`: the one in the patch's topic, preferred),
/// `state` its properties flattened to dotted keys without `$` members (`null`: removed).
/// An empty `state` stays a document (its version is still taken in by the driver).
#[inline(never)]
pub fn twin_desired(payload: &[u8], from_get: bool, topic: Option<u64>) -> Desired {
    let body = parse(payload);
    let desired = if from_get {
        body.get("desired")
    } else {
        Some(&body)
    };
    let Some(Value::Object(d)) = desired else {
        return Desired::Nothing;
    };
    let Some(version) = topic.or_else(|| d.get("$version").and_then(Value::as_u64)) else {
        return Desired::Nothing;
    };
    let mut keys = Map::new();
    flatten(d, true, true, "", &mut keys);
    let mut doc = Map::new();
    doc.insert("version".into(), Value::from(version));
    doc.insert("state".into(), Value::Object(keys));
    Desired::Apply(Value::Object(doc))
}

/// What to do with a desired document of `version`, `taken` being the highest version
/// taken in (by the store, or handed to the pipeline on this connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Apply,
    /// Stale or a duplicate: never applied again.
    Skip,
    /// A twin patch past a missed one: read the whole twin instead.
    Get,
}

/// Shadow versions grow with every update (the agent's own too), so only "above" counts;
/// a twin's desired `$version` grows by one per desired patch, so a patch beyond the next
/// one means one was missed (IoT Hub does not keep them for a disconnected device).
pub fn admit(dialect: Dialect, version: u64, taken: Option<u64>, from_get: bool) -> Admit {
    let t = taken.unwrap_or(0);
    if taken.is_some_and(|t| version <= t) {
        Admit::Skip
    } else if dialect == Dialect::Twin && !from_get && version > t.saturating_add(1) {
        Admit::Get
    } else {
        Admit::Apply
    }
}

/// The twin's whole desired state (a document from its GET) made a patch against the
/// desired state the agent holds (`current`): keys with the same value left out, keys the
/// twin no longer has set to `null` (removed while the agent was away, as a patch would
/// have), so a reconnect re-runs no handler for what did not change.
#[inline(never)]
pub fn reconcile(doc: &mut Value, current: &std::collections::BTreeMap<String, Value>) {
    let Some(Value::Object(state)) = doc.get_mut("state") else {
        return;
    };
    let gone: Vec<&String> = current
        .iter()
        .filter(|(k, v)| !v.is_null() && !state.contains_key(*k))
        .map(|(k, _)| k)
        .collect();
    state.retain(|k, v| current.get(k) != Some(v));
    for k in gone {
        state.insert(k.clone(), Value::Null);
    }
}

/// A JSON payload (`Null` when it is not JSON), with the desired documents' parser.
fn parse(payload: &[u8]) -> Value {
    use crate::model::doc;
    doc::parse_tree(payload, doc::Encoding::Json)
        .ok()
        .and_then(|t| doc::to_json(t, 0, 128).ok())
        .unwrap_or_default()
}

/// Whether every key of `new` has the same value in `last` (a delta taken in already: the
/// shadow publishes the delta again after every update while desired and reported differ,
/// e.g. for a key the pipeline rejected).
pub fn seen(last: &Value, new: &Value) -> bool {
    let (Some(last), Some(new)) = (last.as_object(), new.as_object()) else {
        return false;
    };
    new.iter().all(|(k, v)| last.get(k) == Some(v))
}

/// Most bytes of an apply result in the main shadow: a quarter of its 8 KB of state, the
/// rest left to desired and reported values.
pub const RESULT_MAX: usize = 2048;

/// The update that puts an apply result (docs/PROTOCOL.md §5.3, JSON) under
/// `reported.edgesync.desired_result`, within [`RESULT_MAX`] (see [`trim_result`]). The
/// per-key entries go as an array, `[{"key": K, ...entry}]`: the shadow merges objects, so
/// an object of keys would keep every earlier result's keys and grow the shadow towards
/// 8 KB; arrays replace whole ("Device Shadow service documents",
/// https://docs.aws.amazon.com/iot/latest/developerguide/device-shadow-document.html).
pub fn result_update(payload: &[u8]) -> Vec<u8> {
    result_in(Dialect::Shadow, payload)
}

/// The apply result of `payload` as an update of `reported.edgesync.desired_result` in
/// `dialect` ([`result_update`]; the twin merges objects and replaces arrays as the
/// shadow does, so the result has the same form), within [`Dialect::result_max`].
#[inline(never)]
pub fn result_in(dialect: Dialect, payload: &[u8]) -> Vec<u8> {
    let mut r = parse(payload);
    if let Some(Value::Object(keys)) = r.get_mut("keys").map(std::mem::take) {
        let entries = keys.into_iter().map(|(k, v)| {
            let mut e = Map::new();
            e.insert("key".into(), Value::String(k));
            match v {
                Value::Object(m) => e.extend(m),
                v => {
                    e.insert("status".into(), v);
                }
            }
            Value::Object(e)
        });
        r["keys"] = Value::Array(entries.collect());
    }
    trim_result(&mut r, dialect.result_max());
    // The shadow merges: `null` removes what an earlier result left.
    if let Value::Object(m) = &mut r {
        for k in ["error", "trimmed"] {
            m.entry(k).or_insert(Value::Null);
        }
    }
    let reported = serde_json::json!({"edgesync": {"desired_result": r}});
    dialect.update(&reported, RESULT_TOKEN)
}

/// The request id of apply results (the twin's: followed by a number, see
/// [`is_result_token`]).
pub const RESULT_TOKEN: &str = "edgesync-result";

/// Whether an answer is to an apply result.
pub fn is_result_token(token: &str) -> bool {
    token.starts_with(RESULT_TOKEN)
}

/// Keeps an apply result within `max` bytes of JSON: entries of the `keys` array that do
/// not fit are left out (in order, the first that fit stay), their number in `trimmed`; the
/// other members (`version`, `status`, `error`) stay.
#[inline(never)]
fn trim_result(r: &mut Value, max: usize) {
    if r.to_string().len() <= max {
        return;
    }
    let Some(Value::Array(keys)) = r.get_mut("keys").map(std::mem::take) else {
        return;
    };
    let total = keys.len();
    r["keys"] = Value::Array(Vec::new());
    r["trimmed"] = Value::from(total);
    let mut used = r.to_string().len();
    let mut kept = Vec::new();
    for v in keys {
        // `v,`
        let c = v.to_string().len() + 1;
        if used + c <= max {
            used += c;
            kept.push(v);
        }
    }
    r["trimmed"] = Value::from(total - kept.len());
    r["keys"] = Value::Array(kept);
}

/// A response's `clientToken`, and for `/rejected` its `code` and `message`.
#[inline(never)]
pub fn response(payload: &[u8]) -> (Option<String>, u64, String) {
    let v = parse(payload);
    let token = v
        .get("clientToken")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let code = v.get("code").and_then(Value::as_u64).unwrap_or(0);
    let message = v
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    (token, code, message)
}

/// The reason in a twin error answer's body: its `message` or `Message` (IoT Hub's error
/// JSON), else the text itself, shortened.
pub fn twin_error(payload: &[u8]) -> String {
    let v = parse(payload);
    let m = ["message", "Message"]
        .into_iter()
        .find_map(|k| v.get(k).and_then(Value::as_str));
    match m {
        Some(m) => crate::model::text::shorten(m),
        None => crate::model::text::shorten(&String::from_utf8_lossy(payload)),
    }
}

/// A rejection of the shadow that will not pass however often it is sent again.
pub fn permanent(code: u64) -> bool {
    matches!(code, 400 | 413)
}

/// The next update of a shadow.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// The request document; `None` when every key taken was dropped (nothing to send: the
    /// watermark moves to `top` at once).
    pub payload: Option<Vec<u8>>,
    /// The highest seq it covers.
    pub top: u64,
    pub keys: usize,
    /// Keys that cannot be sent at all, with why.
    pub dropped: Vec<(String, String)>,
}

/// What a rejection did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejected {
    /// Not ours (another client's token, or not in flight).
    Unknown,
    /// Sent again after a backoff.
    Retry(Duration),
    /// Permanent for an update of several keys: they go one at a time from now on.
    Split,
    /// Permanent for one key: dropped; the watermark moves to the returned seq.
    Dropped(u64),
}

#[derive(Debug, Clone)]
struct Inflight {
    token: String,
    top: u64,
    keys: usize,
    sent: Instant,
}

/// Whether the thing may have one more update in flight ([`IN_FLIGHT_MAX`]).
pub fn room(reporters: &[Reporter]) -> bool {
    reporters.iter().filter(|r| r.in_flight()).count() < IN_FLIGHT_MAX
}

/// The reported side of one shadow (see the module docs).
#[derive(Debug)]
pub struct Reporter {
    pub shadow: String,
    pub dialect: Dialect,
    /// Keys with a latest seq up to this are in the shadow (or dropped).
    pub watermark: u64,
    inflight: Option<Inflight>,
    retry_at: Option<Instant>,
    backoff: Backoff,
    /// After a permanent rejection of several keys: one key an update up to this seq.
    single_until: u64,
}

impl Reporter {
    pub fn new(shadow: String, watermark: u64, backoff: Backoff) -> Self {
        Reporter {
            shadow,
            dialect: Dialect::Shadow,
            watermark,
            inflight: None,
            retry_at: None,
            backoff,
            single_until: 0,
        }
    }

    /// The reporter of the device twin.
    pub fn twin(watermark: u64, backoff: Backoff) -> Self {
        let mut r = Reporter::new(TWIN.to_owned(), watermark, backoff);
        r.dialect = Dialect::Twin;
        r
    }

    /// Whether `token` is the update in flight.
    pub fn owns(&self, token: &str) -> bool {
        self.inflight.as_ref().is_some_and(|i| i.token == token)
    }

    /// Whether an update may be sent at `now` (none in flight, no backoff running).
    pub fn ready(&self, now: Instant) -> bool {
        self.inflight.is_none() && self.retry_at.is_none_or(|t| now >= t)
    }

    pub fn in_flight(&self) -> bool {
        self.inflight.is_some()
    }

    /// When something is due: a retry, or the timeout of the update in flight.
    pub fn wake_at(&self) -> Option<Instant> {
        match &self.inflight {
            Some(i) => Some(i.sent + RESPONSE_TIMEOUT),
            None => self.retry_at,
        }
    }

    /// At `now`: a retry that is due is cleared (the reporter is ready again); an update
    /// in flight past [`RESPONSE_TIMEOUT`] is forgotten, to go again (`true`).
    pub fn tick(&mut self, now: Instant) -> bool {
        if self.retry_at.is_some_and(|t| now >= t) {
            self.retry_at = None;
        }
        let late = self
            .inflight
            .as_ref()
            .is_some_and(|i| now >= i.sent + RESPONSE_TIMEOUT);
        if late {
            self.inflight = None;
        }
        late
    }

    /// The next update from `latest` (`(key, seq, value)` of this shadow's keys, any order;
    /// those at or below the watermark are skipped), sent with `token`; `None` when no key
    /// is dirty.
    #[inline(never)]
    pub fn next(
        &mut self,
        mut latest: Vec<(String, u64, Value)>,
        nested: bool,
        token: &str,
        now: Instant,
    ) -> Option<Update> {
        latest.retain(|(_, s, _)| *s > self.watermark);
        let d = self.dialect;
        let budget = d.state_max() - STATE_SLACK;
        let mut reported = Map::new();
        let (mut used, mut keys, mut top) = (0, 0, None);
        let mut dropped = Vec::new();
        // In seq order: the oldest left each time (an update holds few keys; no sort code).
        while let Some(i) = (0..latest.len()).min_by_key(|&i| latest[i].1) {
            let (key, seq, value) = latest.swap_remove(i);
            let c = cost(&key, &value);
            if keys > 0 && (used + c > budget || seq <= self.single_until) {
                break;
            }
            if c > budget {
                let (w, max) = (d.what(), d.state_max());
                dropped.push((
                    key,
                    format!("its value is larger than the {w}'s {max} bytes"),
                ));
            } else if let Err(why) = insert_in(d, &mut reported, &key, value, nested) {
                dropped.push((key, why));
            } else {
                used += c;
                keys += 1;
            }
            top = Some(seq);
            if keys > 0 && seq <= self.single_until {
                break;
            }
        }
        let top = top?;
        let payload = (keys > 0).then(|| {
            self.inflight = Some(Inflight {
                token: token.to_owned(),
                top,
                keys,
                sent: now,
            });
            self.retry_at = None;
            let reported = Value::Object(std::mem::take(&mut reported));
            d.update(&reported, token)
        });
        if payload.is_none() {
            self.watermark = self.watermark.max(top);
        }
        Some(Update {
            payload,
            top,
            keys,
            dropped,
        })
    }

    /// `/update/accepted` with `token`: the new watermark, if it was ours.
    pub fn accepted(&mut self, token: &str) -> Option<u64> {
        let i = self.inflight.take_if(|i| i.token == token)?;
        self.watermark = self.watermark.max(i.top);
        self.backoff.connection_ended(Duration::MAX);
        Some(self.watermark)
    }

    /// `/update/rejected` with `token` and `code` at `now`; `unit` is the jitter.
    #[inline(never)]
    pub fn rejected(&mut self, token: &str, code: u64, now: Instant, unit: f64) -> Rejected {
        let Some(i) = self.inflight.take_if(|i| i.token == token) else {
            return Rejected::Unknown;
        };
        if !self.dialect.permanent(code) {
            let d = self.backoff.next_delay(unit);
            self.retry_at = Some(now + d);
            return Rejected::Retry(d);
        }
        if i.keys > 1 {
            self.single_until = i.top;
            return Rejected::Split;
        }
        self.watermark = self.watermark.max(i.top);
        Rejected::Dropped(self.watermark)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reporter() -> Reporter {
        let b = Backoff::new(
            Duration::from_secs(1),
            Duration::from_secs(8),
            Duration::from_secs(60),
        );
        Reporter::new(String::new(), 0, b)
    }

    fn doc(u: &Update) -> Value {
        serde_json::from_slice(u.payload.as_deref().unwrap_or_default()).unwrap_or_default()
    }

    fn latest(items: &[(&str, u64, Value)]) -> Vec<(String, u64, Value)> {
        items
            .iter()
            .map(|(k, s, v)| ((*k).to_owned(), *s, v.clone()))
            .collect()
    }

    #[test]
    fn dirty_keys_are_reported_nested_and_the_watermark_moves_on_accepted() {
        let mut r = reporter();
        let now = Instant::now();
        let l = latest(&[
            ("led.mode", 3, json!("blink")),
            ("temp", 2, json!(21.5)),
            ("old", 4, Value::Null),
        ]);
        let u = r
            .next(l.clone(), true, "t1", now)
            .unwrap_or_else(|| panic!("dirty"));
        assert_eq!(
            doc(&u),
            json!({"state": {"reported": {"led": {"mode": "blink"}, "temp": 21.5, "old": null}}, "clientToken": "t1"})
        );
        assert_eq!((u.top, u.keys), (4, 3));
        // One update in flight per shadow.
        assert!(!r.ready(now));
        assert_eq!(r.accepted("other"), None);
        assert_eq!(r.accepted("t1"), Some(4));
        assert!(r.ready(now));
        // Nothing dirty any more; a newer value is.
        assert_eq!(r.next(l, true, "t2", now), None);
        let u = r
            .next(latest(&[("temp", 9, json!(22))]), false, "t3", now)
            .unwrap_or_else(|| panic!());
        assert_eq!(doc(&u)["state"]["reported"], json!({"temp": 22}));
        // Flat keys stay dotted when nested is off.
        r.accepted("t3");
        let u = r
            .next(latest(&[("led.mode", 10, json!(1))]), false, "t4", now)
            .unwrap_or_else(|| panic!());
        assert_eq!(doc(&u)["state"]["reported"], json!({"led.mode": 1}));
    }

    #[test]
    fn a_large_state_is_split_in_seq_order_within_8_kb() {
        let mut r = reporter();
        let now = Instant::now();
        let big = "x".repeat(1000);
        let l: Vec<_> = (1..=20).map(|i| (format!("k{i}"), i, json!(big))).collect();
        let mut sent = 0;
        let mut n = 0;
        while let Some(u) = r.next(l.clone(), true, &format!("t{n}"), now) {
            let p = u.payload.clone().unwrap_or_default();
            assert!(p.len() <= STATE_MAX, "{}", p.len());
            assert_eq!(
                doc(&u)["state"]["reported"].as_object().map(Map::len),
                Some(u.keys)
            );
            sent += u.keys;
            r.accepted(&format!("t{n}"));
            assert_eq!(r.watermark, u.top);
            n += 1;
        }
        assert_eq!(sent, 20);
        assert!(n >= 3, "{n} updates");
    }

    #[test]
    fn values_that_cannot_fit_are_dropped_and_the_watermark_passes_them() {
        let mut r = reporter();
        let now = Instant::now();
        let u = r
            .next(
                latest(&[
                    ("huge", 5, json!("y".repeat(9000))),
                    ("deep", 6, json!([[[[[[1]]]]]])),
                ]),
                true,
                "t",
                now,
            )
            .unwrap_or_else(|| panic!());
        assert_eq!((u.payload.as_ref(), u.top, u.dropped.len()), (None, 6, 2));
        assert!(u.dropped[0].1.contains("8192"), "{:?}", u.dropped);
        assert_eq!(r.watermark, 6);
        assert!(r.ready(now));
    }

    #[test]
    fn deep_keys_keep_their_tail_dotted_within_six_levels() {
        let mut m = Map::new();
        insert(&mut m, "a.b.c.d.e.f.g", json!(1), true).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            Value::Object(m.clone()),
            json!({"a": {"b": {"c": {"d": {"e.f.g": 1}}}}})
        );
        let d = crate::model::rules::depth(&json!({"reported": m}));
        assert!(d <= DEPTH_MAX, "{d}");
        // A later key replaces a scalar on its path, as the shadow's merge does.
        let mut m = Map::new();
        insert(&mut m, "led", json!(5), true).unwrap_or_else(|e| panic!("{e}"));
        insert(&mut m, "led.mode", json!("x"), true).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(Value::Object(m), json!({"led": {"mode": "x"}}));
    }

    #[test]
    fn rejections_retry_split_or_drop() {
        let mut r = reporter();
        let now = Instant::now();
        let l = latest(&[("a", 1, json!(1)), ("b", 2, json!(2))]);
        r.next(l.clone(), true, "t1", now);
        assert_eq!(r.rejected("x", 409, now, 0.5), Rejected::Unknown);
        // 409, 429, 5xx: again after the backoff.
        for code in [409, 429, 500, 503] {
            let Rejected::Retry(d) = r.rejected("t1", code, now, 0.99) else {
                panic!("{code}")
            };
            assert!(!r.ready(now));
            assert!(r.ready(now + d));
            assert_eq!(r.wake_at(), Some(now + d));
            assert!(!r.tick(now + d));
            assert_eq!(r.wake_at(), None);
            r.next(l.clone(), true, "t1", now + d);
        }
        // 400 for two keys: one at a time; then 413 for "a" drops it, "b" goes on.
        assert_eq!(r.rejected("t1", 400, now, 0.5), Rejected::Split);
        let u = r
            .next(l.clone(), true, "t2", now)
            .unwrap_or_else(|| panic!());
        assert_eq!((u.keys, u.top), (1, 1));
        assert_eq!(r.rejected("t2", 413, now, 0.5), Rejected::Dropped(1));
        let u = r
            .next(l.clone(), true, "t3", now)
            .unwrap_or_else(|| panic!());
        assert_eq!((u.keys, u.top), (1, 2));
        assert_eq!(r.accepted("t3"), Some(2));
        // Past the split: several keys an update again.
        let u = r
            .next(
                latest(&[("a", 7, json!(1)), ("b", 8, json!(2))]),
                true,
                "t4",
                now,
            )
            .unwrap_or_else(|| panic!());
        assert_eq!(u.keys, 2);
        // No answer: sent again after the timeout.
        assert!(!r.tick(now));
        assert!(r.tick(now + RESPONSE_TIMEOUT));
        assert_eq!(r.wake_at(), None);
        assert!(r.ready(now));
    }

    #[test]
    fn deltas_become_desired_documents() {
        let d = desired(br#"{"version": 12, "timestamp": 1700000000, "state": {"led": {"mode": "blink"}, "setpoint": 20}}"#, false, true);
        let Desired::Apply(doc) = d else {
            panic!("{d:?}")
        };
        assert_eq!(
            doc,
            json!({"version": 12, "ts": 1_700_000_000_000u64, "state": {"led.mode": "blink", "setpoint": 20}})
        );
        // Not nested: an object in a delta is partial; its whole value comes from /get.
        assert_eq!(
            desired(
                br#"{"version": 3, "state": {"cfg": {"a": 1}}}"#,
                false,
                false
            ),
            Desired::Get
        );
        let get = br#"{"version": 9, "state": {"desired": {"cfg": {"a": 1, "b": 2}, "x": 1}, "reported": {"x": 1}, "delta": {"cfg": {"b": 2}}}}"#;
        let Desired::Apply(doc) = desired(get, true, false) else {
            panic!()
        };
        assert_eq!(doc["version"], 9);
        assert_eq!(doc["state"], json!({"cfg": {"a": 1, "b": 2}}));
        let Desired::Apply(doc) = desired(get, true, true) else {
            panic!()
        };
        assert_eq!(doc["state"], json!({"cfg.b": 2}));
        // The same delta again (after an update while a key still differs) is seen.
        assert!(seen(&json!({"cfg.b": 2, "x": 1}), &doc["state"]));
        assert!(!seen(&json!({"cfg.b": 3}), &doc["state"]));
        assert!(!seen(&Value::Null, &doc["state"]));
        // No delta, no version, not JSON: nothing.
        for p in [
            &br#"{"version": 4, "state": {"desired": {"x": 1}}}"#[..],
            br#"{"state": {"x": 1}}"#,
            b"\xa1",
        ] {
            assert_eq!(desired(p, true, true), Desired::Nothing);
        }
    }

    #[test]
    fn results_go_under_reported_edgesync() {
        let r = br#"{"version": 7, "status": "applied", "keys": {"a": {"status": "applied"}}}"#;
        let u: Value = serde_json::from_slice(&result_update(r)).unwrap_or_default();
        assert_eq!(
            u["state"]["reported"]["edgesync"]["desired_result"]["status"],
            "applied"
        );
        assert!(crate::model::rules::depth(&u["state"]) <= DEPTH_MAX);
        let d = &u["state"]["reported"]["edgesync"]["desired_result"];
        assert_eq!((&d["trimmed"], &d["error"]), (&Value::Null, &Value::Null));
        assert_eq!(
            response(br#"{"code": 409, "message": "Version conflict", "clientToken": "t"}"#),
            (Some("t".into()), 409, "Version conflict".into())
        );
    }

    #[test]
    fn a_later_result_replaces_the_per_key_entries_of_an_earlier_one() {
        // AWS merges objects but replaces arrays: drive the emulator's shadow with both.
        use edgesync_testkit::aws::{ShadowKey, ShadowOp, ShadowStore};
        let (mut s, k) = (ShadowStore::default(), ShadowKey::new("pump", None));
        for r in [
            br#"{"version": 3, "status": "partial", "keys": {"a": {"status": "applied"}, "c": {"status": "rejected", "error": "x"}}}"#.as_slice(),
            br#"{"version": 5, "status": "applied", "keys": {"b": {"status": "applied"}}}"#,
        ] {
            let out = s.handle(&k, ShadowOp::Update, &result_update(r), 1, true);
            assert!(out.replies.iter().any(|(t, _)| *t == "update/accepted"));
        }
        let doc = s.document(&k, 2).unwrap_or_default();
        let d = &doc["state"]["reported"]["edgesync"]["desired_result"];
        assert_eq!(d["keys"], json!([{"key": "b", "status": "applied"}]), "{d}");
        assert_eq!(
            (&d["version"], &d["status"]),
            (&json!(5), &json!("applied"))
        );
    }

    #[test]
    fn a_large_result_is_trimmed_within_its_share_of_the_shadow() {
        let keys: Map<String, Value> = (0..500)
            .map(|i| {
                let e =
                    json!({"status": "rejected", "error": format!("key {i}: expected an integer")});
                (format!("setting.{i:03}"), e)
            })
            .collect();
        let r = json!({"version": 41, "status": "partial", "keys": keys}).to_string();
        let u = result_update(r.as_bytes());
        let d: Value = serde_json::from_slice(&u).unwrap_or_default();
        let d = &d["state"]["reported"]["edgesync"]["desired_result"];
        // Within its share, with the `"error":null` that clears an earlier one.
        assert!(
            d.to_string().len() <= RESULT_MAX + 13,
            "{}",
            d.to_string().len()
        );
        assert_eq!(
            (d["version"].clone(), d["status"].clone()),
            (json!(41), json!("partial"))
        );
        let kept = d["keys"].as_array().map_or(0, Vec::len);
        assert!(kept > 10, "{kept}");
        assert_eq!(d["trimmed"], json!(500 - kept));
        // The first keys stay, with their detail.
        assert_eq!(
            (&d["keys"][0]["key"], &d["keys"][0]["status"]),
            (&json!("setting.000"), &json!("rejected"))
        );
        // Without `keys`, nothing to trim: left as it is.
        let mut v = json!({"version": 1, "status": "rejected", "error": "x".repeat(3000)});
        trim_result(&mut v, RESULT_MAX);
        assert!(v.get("trimmed").is_none());
    }

    #[test]
    fn at_most_eight_updates_are_in_flight_across_the_shadows() {
        let now = Instant::now();
        let mut rs: Vec<Reporter> = (0..16)
            .map(|i| {
                let mut r = reporter();
                r.shadow = format!("s{i}");
                r
            })
            .collect();
        // As the session sends: each shadow in turn while there is room.
        let send = |rs: &mut Vec<Reporter>, start: usize| {
            let mut sent = Vec::new();
            let n = rs.len();
            for i in (0..n).map(|j| (start + j) % n) {
                if !room(rs) {
                    break;
                }
                if rs[i].ready(now) {
                    let l = latest(&[("k", 1, json!(1))]);
                    if rs[i].next(l, true, &format!("t{i}"), now).is_some() {
                        sent.push(i);
                    }
                }
            }
            sent
        };
        assert_eq!(send(&mut rs, 0), (0..8).collect::<Vec<_>>());
        assert_eq!(rs.iter().filter(|r| r.in_flight()).count(), IN_FLIGHT_MAX);
        assert!(send(&mut rs, 1).is_empty());
        // An answer (or a timeout) makes room for one more: the next shadow's turn.
        assert_eq!(rs[3].accepted("t3"), Some(1));
        assert_eq!(send(&mut rs, 8), [8]);
        assert!(rs[5].tick(now + RESPONSE_TIMEOUT));
        assert_eq!(send(&mut rs, 9), [9]);
        assert!(!room(&rs));
    }
    fn twin() -> Reporter {
        let b = Backoff::new(
            Duration::from_secs(1),
            Duration::from_secs(8),
            Duration::from_secs(60),
        );
        Reporter::twin(0, b)
    }

    #[test]
    fn the_twin_patch_is_the_bare_reported_object_nested_at_dots() {
        let mut r = twin();
        let now = Instant::now();
        let l = latest(&[("led.mode", 3, json!("blink")), ("temp", 2, json!(21.5))]);
        let u = r.next(l, false, "es-1", now).unwrap_or_else(|| panic!());
        // Always nested (a twin name may not hold a dot), no envelope: the rid is in the topic.
        assert_eq!(doc(&u), json!({"led": {"mode": "blink"}, "temp": 21.5}));
        assert_eq!(
            (r.shadow.as_str(), r.owns("es-1"), r.owns("x")),
            (TWIN, true, false)
        );
        assert_eq!(r.accepted("es-1"), Some(3));
        assert_eq!(Dialect::Twin.get_body("t"), b"");
        assert_eq!(Dialect::Shadow.get_body("t"), br#"{"clientToken":"t"}"#);
    }

    #[test]
    fn twin_patches_fill_32_kb_and_what_breaks_the_twin_rules_is_dropped_with_why() {
        let mut r = twin();
        let now = Instant::now();
        let big = "x".repeat(3000);
        let l: Vec<_> = (1..=30).map(|i| (format!("k{i}"), i, json!(big))).collect();
        let u = r.next(l, true, "t", now).unwrap_or_else(|| panic!());
        let p = u.payload.clone().unwrap_or_default();
        assert!(
            p.len() <= TWIN_STATE_MAX && u.keys >= 9,
            "{} {}",
            p.len(),
            u.keys
        );
        r.accepted("t");
        let mut r = twin();
        let deep = (0..10).fold(json!(1), |v, _| json!({"a": v}));
        let cases = [
            ("name.dollar", json!({"$x": 1}), "property name"),
            ("name.dot", json!({"a.b": 1}), "property name"),
            ("name.space", json!({"a b": 1}), "property name"),
            ("name.control", json!({"a\u{85}": 1}), "property name"),
            ("name.long", json!({"n".repeat(1025): 1}), "property name"),
            ("empty..segment", json!(1), "property name"),
            ("string", json!("s".repeat(4097)), "4096"),
            ("int", json!(1u64 << 52), "2^52"),
            ("neg", json!(-(1i64 << 52) - 1), "2^52"),
            ("deep", deep, "10 levels"),
            ("a.b.c.d.e.f.g.h.i.j.k", json!(1), "10 levels"),
            ("huge", json!("y".repeat(40_000)), "32768"),
        ];
        let l: Vec<_> = cases
            .iter()
            .enumerate()
            .map(|(i, (k, v, _))| ((*k).to_owned(), i as u64 + 1, v.clone()))
            .collect();
        let u = r.next(l, true, "t", now).unwrap_or_else(|| panic!());
        assert_eq!((u.payload.as_ref(), u.dropped.len()), (None, cases.len()));
        for ((key, why), (k, _, want)) in u.dropped.iter().zip(&cases) {
            assert_eq!(key, k);
            assert!(why.contains(want), "{key}: {why}");
        }
        assert_eq!(r.watermark, cases.len() as u64);
        // At the bounds: still a twin's.
        let ok = latest(&[
            ("a.b.c.d.e.f.g.h.i.j", 20, json!(1)),
            ("s", 21, json!("s".repeat(4096))),
            ("i", 22, json!((1i64 << 52) - 1)),
            (
                "n",
                23,
                json!({"é-ok_1": [1, {"x": -(1i64 << 52)}], "m": 1.5e300}),
            ),
        ]);
        let u = r.next(ok, true, "t2", now).unwrap_or_else(|| panic!());
        assert_eq!((u.keys, u.dropped.len()), (4, 0), "{:?}", u.dropped);
        // The patch (the reported object) is level 1: at most 10.
        assert!(crate::model::rules::depth(&doc(&u)) <= TWIN_DEPTH_MAX);
    }

    #[test]
    fn twin_answers_retry_on_429_and_5xx_and_split_then_drop_on_400() {
        let mut r = twin();
        let now = Instant::now();
        let l = latest(&[("a", 1, json!(1)), ("b", 2, json!(2))]);
        r.next(l.clone(), true, "t1", now);
        for code in [429, 500, 503] {
            assert!(matches!(
                r.rejected("t1", code, now, 0.5),
                Rejected::Retry(_)
            ));
            r.next(l.clone(), true, "t1", now + Duration::from_secs(60));
        }
        assert_eq!(r.rejected("t1", 400, now, 0.5), Rejected::Split);
        r.next(l.clone(), true, "t2", now);
        assert_eq!(r.rejected("t2", 400, now, 0.5), Rejected::Dropped(1));
        r.next(l.clone(), true, "t3", now);
        assert_eq!(r.accepted("t3"), Some(2));
        let t = Dialect::Twin;
        assert!(!t.permanent(429) && !t.permanent(500) && !t.permanent(503));
        assert!(t.permanent(400) && t.permanent(403) && t.permanent(413));
        assert!(!Dialect::Shadow.permanent(403) && Dialect::Shadow.permanent(413));
        assert_eq!(
            twin_error(br#"{"Message":"{\"errorCode\":400004}","ExceptionMessage":""}"#),
            r#"{"errorCode":400004}"#
        );
        assert_eq!(twin_error(b"bad patch"), "bad patch");
    }

    #[test]
    fn twin_desired_patches_and_the_get_become_desired_documents() {
        let patch = br#"{"led": {"mode": "blink", "old": null}, "setpoint": 20, "gone": null, "$version": 8}"#;
        let Desired::Apply(d) = twin_desired(patch, false, Some(8)) else {
            panic!()
        };
        assert_eq!(
            d,
            json!({"version": 8, "state": {"led.mode": "blink", "led.old": null, "setpoint": 20, "gone": null}})
        );
        // The topic's version wins; the body's serves without it.
        let Desired::Apply(d) = twin_desired(br#"{"x": 1, "$version": 3}"#, false, None) else {
            panic!()
        };
        assert_eq!(d["version"], 3);
        let get = br#"{"desired": {"x": {"y": 1, "$metadata": {"a": 1}}, "$version": 5}, "reported": {"z": 1, "$version": 9}}"#;
        let Desired::Apply(d) = twin_desired(get, true, None) else {
            panic!()
        };
        assert_eq!(d, json!({"version": 5, "state": {"x.y": 1}}));
        // An empty desired is a document too (its version is taken in).
        let Desired::Apply(d) = twin_desired(br#"{"desired": {"$version": 1}}"#, true, None) else {
            panic!()
        };
        assert_eq!(d["state"], json!({}));
        for p in [&b"{}"[..], br#"{"desired": 1}"#, b"\xa1", br#"{"x": 1}"#] {
            assert_eq!(twin_desired(p, false, None), Desired::Nothing, "{p:?}");
        }
        assert_eq!(
            twin_desired(br#"{"reported": {}}"#, true, None),
            Desired::Nothing
        );
    }

    #[test]
    fn stale_and_duplicate_versions_are_never_applied_and_a_gap_reads_the_twin() {
        use Admit::{Apply, Get, Skip};
        let t = Dialect::Twin;
        // The next version applies; the same or an older one never again.
        assert_eq!(admit(t, 6, Some(5), false), Apply);
        assert_eq!(admit(t, 5, Some(5), false), Skip);
        assert_eq!(admit(t, 4, Some(5), false), Skip);
        assert_eq!(admit(t, 5, Some(5), true), Skip);
        assert_eq!(admit(t, 3, Some(5), true), Skip);
        // A patch past a missed one: GET; the GET itself applies whatever its version.
        assert_eq!(admit(t, 7, Some(5), false), Get);
        assert_eq!(admit(t, 9, Some(5), true), Apply);
        assert_eq!(admit(t, 2, None, false), Get);
        assert_eq!(admit(t, 1, None, false), Apply);
        assert_eq!(admit(t, 1, None, true), Apply);
        // Shadow versions have gaps by nature.
        assert_eq!(admit(Dialect::Shadow, 9, Some(5), false), Apply);
        assert_eq!(admit(Dialect::Shadow, 5, Some(5), false), Skip);
    }

    #[test]
    fn the_get_reconciles_against_the_desired_state_held() {
        let held: std::collections::BTreeMap<String, Value> = [
            ("same", json!(1)),
            ("changed", json!(1)),
            ("removed", json!("x")),
            ("was.null", Value::Null),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let mut doc = json!({"version": 9, "state": {"same": 1, "changed": 2, "new": {"a": 1}}});
        reconcile(&mut doc, &held);
        assert_eq!(
            doc,
            json!({"version": 9, "state": {"changed": 2, "new": {"a": 1}, "removed": null}})
        );
        // Nothing changed: an empty document (its version is still taken in).
        let mut doc = json!({"version": 10, "state": {"same": 1}});
        let held: std::collections::BTreeMap<String, Value> =
            [("same".to_owned(), json!(1))].into_iter().collect();
        reconcile(&mut doc, &held);
        assert_eq!(doc["state"], json!({}));
    }

    #[test]
    fn twin_results_patch_reported_edgesync_within_4_kb() {
        let r = br#"{"version": 7, "status": "applied", "keys": {"a": {"status": "applied"}}}"#;
        let u: Value = serde_json::from_slice(&result_in(Dialect::Twin, r)).unwrap_or_default();
        assert_eq!(
            u,
            json!({"edgesync": {"desired_result": {"version": 7, "status": "applied", "keys": [{"key": "a", "status": "applied"}], "error": null, "trimmed": null}}})
        );
        let keys: Map<String, Value> = (0..500)
            .map(|i| {
                (
                    format!("k.{i:03}"),
                    json!({"status": "rejected", "error": "x".repeat(40)}),
                )
            })
            .collect();
        let r = json!({"version": 8, "status": "rejected", "keys": keys}).to_string();
        let u: Value =
            serde_json::from_slice(&result_in(Dialect::Twin, r.as_bytes())).unwrap_or_default();
        let d = &u["edgesync"]["desired_result"];
        assert!(d.to_string().len() <= TWIN_STRING_MAX + 13);
        assert!(d["trimmed"].as_u64().is_some_and(|n| n > 400), "{d}");
        assert!(is_result_token("edgesync-result-3") && !is_result_token("es-1-1"));
        // The AWS form is unchanged.
        assert_eq!(
            result_update(r.as_bytes()),
            result_in(Dialect::Shadow, r.as_bytes())
        );
    }
}
