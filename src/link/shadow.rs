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

/// `key` set to `value` in `reported`: split at dots into nested objects when `nested`, at
/// most as deep as the shadow allows (the rest of the key stays dotted in the innermost
/// member). `Err` when the value alone nests too deep. A later key replaces an earlier
/// value on its path, as the shadow's own merge does.
#[inline(never)]
fn insert(
    reported: &mut Map<String, Value>,
    key: &str,
    value: Value,
    nested: bool,
) -> Result<(), String> {
    let room = (DEPTH_MAX - 1).checked_sub(crate::model::rules::depth(&value));
    let levels = match room {
        Some(r) if r >= 1 => {
            if nested {
                r
            } else {
                1
            }
        }
        _ => {
            return Err(format!(
                "its value nests deeper than the shadow's {DEPTH_MAX} levels"
            ));
        }
    };
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

/// Dotted keys of a shadow state object: nested objects flattened when `nested`.
pub fn flatten(
    state: &Map<String, Value>,
    nested: bool,
    prefix: &str,
    out: &mut Map<String, Value>,
) {
    for (k, v) in state {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            Value::Object(m) if nested && !m.is_empty() => flatten(m, nested, &key, out),
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
        flatten(delta, true, "", &mut keys);
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
    trim_result(&mut r, RESULT_MAX);
    // The shadow merges: `null` removes what an earlier result left.
    if let Value::Object(m) = &mut r {
        for k in ["error", "trimmed"] {
            m.entry(k).or_insert(Value::Null);
        }
    }
    format!(r#"{{"state":{{"reported":{{"edgesync":{{"desired_result":{r}}}}}}},"clientToken":"edgesync-result"}}"#)
        .into_bytes()
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

/// A rejection that will not pass however often it is sent again.
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
            watermark,
            inflight: None,
            retry_at: None,
            backoff,
            single_until: 0,
        }
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
        let budget = STATE_MAX - STATE_SLACK;
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
                dropped.push((
                    key,
                    format!("its value is larger than the shadow's {STATE_MAX} bytes"),
                ));
            } else if let Err(why) = insert(&mut reported, &key, value, nested) {
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
            format!(r#"{{"state":{{"reported":{reported}}},"clientToken":"{token}"}}"#).into_bytes()
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
        if !permanent(code) {
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
}
