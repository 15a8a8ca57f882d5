//! The Device Shadow service as a plain state machine: requests in (operation, payload,
//! time), responses out (topic suffix, JSON). No sockets; [`super::AwsIot`] wires it to MQTT.
//!
//! Sources (AWS IoT Core Developer Guide):
//! - <https://docs.aws.amazon.com/iot/latest/developerguide/device-shadow-document.html>:
//!   request/response documents, delta rules (nested path to the root, arrays as values),
//!   versioning, 64-byte `clientToken`, empty sections, no `null` in arrays.
//! - <https://docs.aws.amazon.com/iot/latest/developerguide/device-shadow-data-flow.html>:
//!   `null` deletes a property, optimistic locking (409 "Version conflict"), delete keeps the
//!   version counter, abbreviated `delete/accepted`.
//! - <https://docs.aws.amazon.com/iot/latest/developerguide/device-shadow-mqtt.html>: which
//!   topic gets what; `/update/delta` carries every differing desired attribute.
//! - <https://docs.aws.amazon.com/iot/latest/developerguide/device-shadow-error-messages.html>:
//!   codes and messages of the error documents.
//! - <https://docs.aws.amazon.com/iot/latest/developerguide/diagnosing-shadows.html>: 8 KB of
//!   `desired` + `reported` data per shadow; metadata does not count.
//! - <https://docs.aws.amazon.com/general/latest/gr/iot-core.html> (Device Shadow quotas):
//!   6 levels of nesting, 10 in-flight requests, 128 KB messages.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Map, Value, json};

/// The documented limits; `Default` is AWS IoT Core's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShadowLimits {
    /// Bytes of `desired` + `reported` (compact JSON) a shadow may hold after an update.
    pub max_state_bytes: usize,
    /// Levels of nesting inside `desired` / `reported` (`{"a":1}` is 1).
    pub max_depth: usize,
    /// Bytes of a `clientToken`.
    pub max_client_token_bytes: usize,
    /// Bytes of one request message (the message broker's limit).
    pub max_payload_bytes: usize,
    /// Shadows kept (all things together); an update creating one more is answered 500
    /// "Internal service failure" (a test-tool cap, not an AWS limit).
    pub max_shadows: usize,
}

impl Default for ShadowLimits {
    fn default() -> Self {
        ShadowLimits {
            max_state_bytes: 8 * 1024,
            max_depth: 6,
            max_client_token_bytes: 64,
            max_payload_bytes: 128 * 1024,
            max_shadows: 10_000,
        }
    }
}

/// Which shadow: a thing's classic shadow (`name: None`) or one of its named shadows.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShadowKey {
    pub thing: String,
    pub name: Option<String>,
}

impl ShadowKey {
    pub fn new(thing: &str, name: Option<&str>) -> ShadowKey {
        ShadowKey {
            thing: thing.to_owned(),
            name: name.map(str::to_owned),
        }
    }

    /// `$aws/things/T/shadow` or `$aws/things/T/shadow/name/S`.
    pub fn topic_prefix(&self) -> String {
        match &self.name {
            None => format!("$aws/things/{}/shadow", self.thing),
            Some(n) => format!("$aws/things/{}/shadow/name/{n}", self.thing),
        }
    }
}

/// A shadow operation (the request topic's last level).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShadowOp {
    Update,
    Get,
    Delete,
}

/// The documented message of an error code (device-shadow-error-messages.html); 503 is not
/// in that table and gets a plain "Service Unavailable".
pub fn error_message(code: u16) -> &'static str {
    match code {
        400 => "Invalid JSON",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Thing not found",
        409 => "Version conflict",
        413 => "The payload exceeds the maximum size allowed",
        415 => "Unsupported documented encoding; supported encoding is UTF-8",
        429 => "Too Many Requests",
        503 => "Service Unavailable",
        _ => "Internal service failure",
    }
}

/// What one request produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    /// `(topic suffix, payload)`, e.g. `("update/accepted", {...})`, in publishing order.
    pub replies: Vec<(&'static str, Value)>,
    /// The error code when the request was rejected.
    pub rejected: Option<u16>,
    /// The shadow's version after an accepted update or delete.
    pub version: Option<u64>,
    /// Whether an `update/delta` is among the replies.
    pub delta: bool,
}

#[derive(Debug, Clone, Default)]
struct Shadow {
    /// `None`: never created, or deleted (the version counter survives a delete).
    doc: Option<Doc>,
    version: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
struct Doc {
    desired: Option<Map<String, Value>>,
    reported: Option<Map<String, Value>>,
    meta_desired: Map<String, Value>,
    meta_reported: Map<String, Value>,
}

/// Every shadow of every thing, with their version counters and injected failures.
#[derive(Debug, Default)]
pub struct ShadowStore {
    limits: ShadowLimits,
    shadows: HashMap<ShadowKey, Shadow>,
    /// The next `n` device updates of a shadow are rejected with `code`.
    injected: HashMap<ShadowKey, (u16, usize)>,
}

struct Request {
    client_token: Option<String>,
    value: Value,
}

impl ShadowStore {
    pub fn new(limits: ShadowLimits) -> ShadowStore {
        ShadowStore {
            limits,
            ..ShadowStore::default()
        }
    }

    /// Rejects the next `count` updates of `key` with `code` (0 clears it).
    pub fn inject_update_errors(&mut self, key: &ShadowKey, code: u16, count: usize) {
        if count == 0 {
            self.injected.remove(key);
        } else {
            self.injected.insert(key.clone(), (code, count));
        }
    }

    /// The full document as `get/accepted` carries it (without `clientToken`), or `None`
    /// when the shadow does not exist.
    pub fn document(&self, key: &ShadowKey, now: u64) -> Option<Value> {
        let shadow = self.shadows.get(key)?;
        let doc = shadow.doc.as_ref()?;
        Some(full_document(doc, shadow.version, now))
    }

    /// The version counter (0 if the shadow was never created).
    pub fn version(&self, key: &ShadowKey) -> u64 {
        self.shadows.get(key).map_or(0, |s| s.version)
    }

    /// Handles one request published on `<prefix>/<op>`. `injectable`: device requests
    /// consume injected failures; cloud-side updates ([`super::AwsIot::update_desired`]) do not.
    pub fn handle(
        &mut self,
        key: &ShadowKey,
        op: ShadowOp,
        payload: &[u8],
        now: u64,
        injectable: bool,
    ) -> Outcome {
        let reject_topic = match op {
            ShadowOp::Update => "update/rejected",
            ShadowOp::Get => "get/rejected",
            ShadowOp::Delete => "delete/rejected",
        };
        let req = match self.parse(op, payload) {
            Ok(r) => r,
            Err((code, msg, token)) => return rejected(reject_topic, code, msg, token, now),
        };
        let token = req.client_token.clone();
        match op {
            ShadowOp::Get => match self.document(key, now) {
                Some(mut doc) => {
                    if let (Some(t), Some(o)) = (&token, doc.as_object_mut()) {
                        o.insert("clientToken".into(), Value::String(t.clone()));
                    }
                    Outcome {
                        replies: vec![("get/accepted", doc)],
                        ..Outcome::default()
                    }
                }
                None => rejected(reject_topic, 404, &not_found(key), token, now),
            },
            ShadowOp::Delete => {
                let Some(shadow) = self.shadows.get_mut(key).filter(|s| s.doc.is_some()) else {
                    return rejected(reject_topic, 404, &not_found(key), token, now);
                };
                shadow.doc = None;
                let mut body = json!({"version": shadow.version, "timestamp": now});
                with_token(&mut body, &token);
                Outcome {
                    replies: vec![("delete/accepted", body)],
                    version: Some(shadow.version),
                    ..Outcome::default()
                }
            }
            ShadowOp::Update => self.update(key, req, now, injectable),
        }
    }

    fn parse(
        &self,
        op: ShadowOp,
        payload: &[u8],
    ) -> Result<Request, (u16, &'static str, Option<String>)> {
        if payload.len() > self.limits.max_payload_bytes {
            return Err((413, error_message(413), None));
        }
        let Ok(text) = std::str::from_utf8(payload) else {
            return Err((415, error_message(415), None));
        };
        // get and delete take an empty message (or one with just a clientToken).
        if op != ShadowOp::Update && text.trim().is_empty() {
            return Ok(Request {
                client_token: None,
                value: Value::Object(Map::new()),
            });
        }
        let Ok(value) = serde_json::from_str::<Value>(text) else {
            return Err((400, "Invalid JSON", None));
        };
        let Some(obj) = value.as_object() else {
            return Err((400, "Invalid JSON", None));
        };
        let client_token = match obj.get("clientToken") {
            None => None,
            Some(Value::String(t)) if t.len() <= self.limits.max_client_token_bytes => {
                Some(t.clone())
            }
            Some(_) => return Err((400, "Invalid clientToken", None)),
        };
        Ok(Request {
            client_token,
            value,
        })
    }

    fn update(&mut self, key: &ShadowKey, req: Request, now: u64, injectable: bool) -> Outcome {
        let token = req.client_token;
        let reject =
            |code: u16, msg: &str| rejected("update/rejected", code, msg, token.clone(), now);
        if injectable && let Some((code, left)) = self.injected.get_mut(key) {
            let code = *code;
            *left -= 1;
            if *left == 0 {
                self.injected.remove(key);
            }
            return reject(code, error_message(code));
        }
        let obj = req.value.as_object().cloned().unwrap_or_default();
        let expected = match obj.get("version") {
            None => None,
            Some(v) => match v.as_u64() {
                Some(n) => Some(n),
                None => return reject(400, "Invalid version"),
            },
        };
        let state = match obj.get("state") {
            None => return reject(400, "Missing required node: state"),
            // `"state": null` clears both sections; the shadow stays (data-flow page).
            Some(Value::Null) => Map::from_iter([
                ("desired".to_owned(), Value::Null),
                ("reported".to_owned(), Value::Null),
            ]),
            Some(Value::Object(s)) => s.clone(),
            Some(_) => return reject(400, "State node must be an object"),
        };
        for (k, v) in &state {
            let what = match k.as_str() {
                "desired" => "Desired node must be an object",
                "reported" => "Reported node must be an object",
                _ => return reject(400, "State contains an invalid node"),
            };
            if !(v.is_object() || v.is_null()) {
                return reject(400, what);
            }
            if depth(v) > self.limits.max_depth {
                return reject(
                    400,
                    "JSON contains too many levels of nesting; maximum is 6",
                );
            }
            if has_null_in_array(v) {
                return reject(400, "State contains an invalid node");
            }
        }
        if !self.shadows.contains_key(key) && self.shadows.len() >= self.limits.max_shadows {
            return reject(500, error_message(500));
        }
        let shadow = self.shadows.entry(key.clone()).or_default();
        if let Some(v) = expected
            && v != shadow.version
        {
            return reject(409, "Version conflict");
        }
        let previous = shadow.doc.clone().unwrap_or_default();
        let mut current = previous.clone();
        for (section, patch) in &state {
            let (data, meta) = if section == "desired" {
                (&mut current.desired, &mut current.meta_desired)
            } else {
                (&mut current.reported, &mut current.meta_reported)
            };
            match patch {
                Value::Object(p) => {
                    let d = data.get_or_insert_with(Map::new);
                    merge(d, meta, p, now);
                    if d.is_empty() {
                        *data = None;
                    }
                }
                _ => {
                    *data = None;
                    meta.clear();
                }
            }
        }
        if state_bytes(&current) > self.limits.max_state_bytes {
            return reject(413, error_message(413));
        }
        let prev_version = shadow.version;
        shadow.version += 1;
        let version = shadow.version;
        shadow.doc = Some(current.clone());

        let mut replies = Vec::with_capacity(3);
        let mut accepted = json!({
            "state": Value::Object(state.clone()),
            "metadata": Value::Object(state.iter().map(|(k, v)| (k.clone(), meta_of(v, now))).collect()),
            "version": version,
            "timestamp": now,
        });
        with_token(&mut accepted, &token);
        replies.push(("update/accepted", accepted));
        let mut documents = json!({
            "previous": section_doc(&previous, prev_version),
            "current": section_doc(&current, version),
            "timestamp": now,
        });
        with_token(&mut documents, &token);
        replies.push(("update/documents", documents));
        // Deltas follow desired changes: "when it accepts a change ... and the request state
        // document contains different values for desired and reported" (device-shadow-mqtt).
        let touched_desired = state.get("desired").is_some_and(Value::is_object);
        let mut delta_published = false;
        if touched_desired && let Some((d, m)) = delta(&current) {
            let mut body = json!({
                "state": d,
                "metadata": m,
                "version": version,
                "timestamp": now,
            });
            with_token(&mut body, &token);
            replies.push(("update/delta", body));
            delta_published = true;
        }
        Outcome {
            replies,
            rejected: None,
            version: Some(version),
            delta: delta_published,
        }
    }
}

fn not_found(key: &ShadowKey) -> String {
    format!(
        "No shadow exists with name: '{}'",
        key.name.as_deref().unwrap_or(&key.thing)
    )
}

fn rejected(topic: &'static str, code: u16, msg: &str, token: Option<String>, now: u64) -> Outcome {
    let mut body = json!({"code": code, "message": msg, "timestamp": now});
    with_token(&mut body, &token);
    Outcome {
        replies: vec![(topic, body)],
        rejected: Some(code),
        ..Outcome::default()
    }
}

fn with_token(body: &mut Value, token: &Option<String>) {
    if let (Some(t), Some(o)) = (token, body.as_object_mut()) {
        o.insert("clientToken".into(), Value::String(t.clone()));
    }
}

/// Merges `patch` into `data`: `null` removes, objects merge recursively, anything else
/// (arrays included) replaces. Objects left empty are removed. `meta` mirrors `data` with
/// `{"timestamp": now}` at each updated leaf.
fn merge(
    data: &mut Map<String, Value>,
    meta: &mut Map<String, Value>,
    patch: &Map<String, Value>,
    now: u64,
) {
    for (k, p) in patch {
        match p {
            Value::Null => {
                data.remove(k);
                meta.remove(k);
            }
            Value::Object(po) => {
                if !data.get(k).is_some_and(Value::is_object) {
                    data.insert(k.clone(), Value::Object(Map::new()));
                }
                if !meta
                    .get(k)
                    .is_some_and(|m| m.is_object() && m.get("timestamp").is_none())
                {
                    meta.insert(k.clone(), Value::Object(Map::new()));
                }
                let empty = match (data.get_mut(k), meta.get_mut(k)) {
                    (Some(Value::Object(d)), Some(Value::Object(m))) => {
                        merge(d, m, po, now);
                        d.is_empty()
                    }
                    _ => false,
                };
                if empty {
                    data.remove(k);
                    meta.remove(k);
                }
            }
            v => {
                data.insert(k.clone(), v.clone());
                meta.insert(k.clone(), json!({"timestamp": now}));
            }
        }
    }
}

/// Metadata of a request section: `{"timestamp": now}` at every leaf (`null` included).
fn meta_of(v: &Value, now: u64) -> Value {
    match v {
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| (k.clone(), meta_of(v, now)))
                .collect(),
        ),
        _ => json!({"timestamp": now}),
    }
}

/// Levels of nesting: a scalar is 0, a container 1 + its deepest child.
pub fn depth(v: &Value) -> usize {
    match v {
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn has_null_in_array(v: &Value) -> bool {
    match v {
        Value::Object(o) => o.values().any(has_null_in_array),
        Value::Array(a) => a.iter().any(|e| e.is_null() || has_null_in_array(e)),
        _ => false,
    }
}

/// Compact JSON bytes of `desired` + `reported` (what counts toward the 8 KB).
fn state_bytes(doc: &Doc) -> usize {
    let len = |m: &Option<Map<String, Value>>| {
        m.as_ref()
            .and_then(|m| serde_json::to_vec(m).ok())
            .map_or(0, |b| b.len())
    };
    len(&doc.desired) + len(&doc.reported)
}

/// Desired leaves that differ from reported, with the full path to the root (arrays are
/// values), and their desired metadata. `None` when nothing differs.
pub fn delta_of(
    desired: &Map<String, Value>,
    reported: Option<&Map<String, Value>>,
    meta: &Map<String, Value>,
) -> Option<(Value, Value)> {
    let mut d = Map::new();
    let mut m = Map::new();
    for (k, want) in desired {
        let have = reported.and_then(|r| r.get(k));
        let meta_k = meta.get(k).cloned().unwrap_or(Value::Null);
        match (want, have) {
            (Value::Object(wo), Some(Value::Object(ho))) => {
                let sub_meta = meta_k.as_object().cloned().unwrap_or_default();
                if let Some((sd, sm)) = delta_of(wo, Some(ho), &sub_meta) {
                    d.insert(k.clone(), sd);
                    m.insert(k.clone(), sm);
                }
            }
            (w, Some(h)) if w == h => {}
            (w, _) => {
                d.insert(k.clone(), w.clone());
                m.insert(k.clone(), meta_k);
            }
        }
    }
    (!d.is_empty()).then_some((Value::Object(d), Value::Object(m)))
}

fn delta(doc: &Doc) -> Option<(Value, Value)> {
    delta_of(
        doc.desired.as_ref()?,
        doc.reported.as_ref(),
        &doc.meta_desired,
    )
}

fn sections(doc: &Doc) -> (Map<String, Value>, Map<String, Value>) {
    let mut state = Map::new();
    let mut meta = Map::new();
    if let Some(d) = &doc.desired {
        state.insert("desired".into(), Value::Object(d.clone()));
        meta.insert("desired".into(), Value::Object(doc.meta_desired.clone()));
    }
    if let Some(r) = &doc.reported {
        state.insert("reported".into(), Value::Object(r.clone()));
        meta.insert("reported".into(), Value::Object(doc.meta_reported.clone()));
    }
    (state, meta)
}

/// `previous` / `current` of `update/documents`.
fn section_doc(doc: &Doc, version: u64) -> Value {
    let (state, meta) = sections(doc);
    json!({"state": state, "metadata": meta, "version": version})
}

/// The `get/accepted` document: state with `delta` when desired differs from reported.
fn full_document(doc: &Doc, version: u64, now: u64) -> Value {
    let (mut state, meta) = sections(doc);
    if let Some((d, _)) = delta(doc) {
        state.insert("delta".into(), d);
    }
    json!({"state": state, "metadata": meta, "version": version, "timestamp": now})
}

/// Counts of the shadow service's answers to device requests, by operation and code (cloud
/// calls such as [`super::AwsIot::update_desired`] are not requests; their deltas count).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShadowCounts {
    pub updates_accepted: u64,
    /// Rejected updates by error code.
    pub updates_rejected: BTreeMap<u16, u64>,
    pub gets_accepted: u64,
    pub gets_rejected: u64,
    pub deletes_accepted: u64,
    pub deletes_rejected: u64,
    /// `update/delta` messages published.
    pub deltas_published: u64,
}

impl ShadowCounts {
    pub(crate) fn count(&mut self, op: ShadowOp, out: &Outcome) {
        match (op, out.rejected) {
            (ShadowOp::Update, None) => self.updates_accepted += 1,
            (ShadowOp::Update, Some(c)) => *self.updates_rejected.entry(c).or_default() += 1,
            (ShadowOp::Get, None) => self.gets_accepted += 1,
            (ShadowOp::Get, Some(_)) => self.gets_rejected += 1,
            (ShadowOp::Delete, None) => self.deletes_accepted += 1,
            (ShadowOp::Delete, Some(_)) => self.deletes_rejected += 1,
        }
        if out.delta {
            self.deltas_published += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ShadowKey {
        ShadowKey::new("pump", None)
    }

    fn update(s: &mut ShadowStore, body: Value) -> Outcome {
        s.handle(
            &key(),
            ShadowOp::Update,
            body.to_string().as_bytes(),
            100,
            true,
        )
    }

    fn reply<'a>(out: &'a Outcome, topic: &str) -> Option<&'a Value> {
        out.replies
            .iter()
            .find(|(t, _)| *t == topic)
            .map(|(_, v)| v)
    }

    #[test]
    fn accepted_update_echoes_token_counts_versions_and_timestamps_leaves() {
        let mut s = ShadowStore::default();
        let out = update(
            &mut s,
            json!({"state":{"reported":{"a":1,"b":{"c":"x"}}},"clientToken":"t1"}),
        );
        let acc = reply(&out, "update/accepted").unwrap();
        assert_eq!(acc["version"], 1);
        assert_eq!(acc["clientToken"], "t1");
        assert_eq!(acc["state"]["reported"]["b"]["c"], "x");
        assert_eq!(acc["metadata"]["reported"]["b"]["c"]["timestamp"], 100);
        assert_eq!(acc["timestamp"], 100);
        let docs = reply(&out, "update/documents").unwrap();
        assert_eq!(docs["previous"]["version"], 0);
        assert_eq!(docs["current"]["version"], 1);
        assert_eq!(docs["current"]["state"]["reported"]["a"], 1);
        assert!(
            reply(&out, "update/delta").is_none(),
            "reported only: no delta"
        );
        let out = update(&mut s, json!({"state":{"reported":{"a":2}}}));
        assert_eq!(out.version, Some(2));
        let doc = s.document(&key(), 5).unwrap();
        assert_eq!(doc["state"]["reported"], json!({"a":2,"b":{"c":"x"}}));
        assert_eq!(doc["version"], 2);
    }

    #[test]
    fn delta_holds_every_differing_desired_leaf_with_its_path() {
        let mut s = ShadowStore::default();
        update(
            &mut s,
            json!({"state":{"reported":{"lights":{"color":{"r":255,"g":0,"b":255}},"engine":"ON"}}}),
        );
        let out = update(
            &mut s,
            json!({"state":{"desired":{"lights":{"color":{"r":255,"g":255,"b":255}},"mode":"eco","engine":"ON"}},"clientToken":"c"}),
        );
        let delta = reply(&out, "update/delta").unwrap();
        assert_eq!(
            delta["state"],
            json!({"lights":{"color":{"g":255}},"mode":"eco"})
        );
        assert_eq!(delta["metadata"]["lights"]["color"]["g"]["timestamp"], 100);
        assert_eq!(delta["version"], 2);
        assert_eq!(delta["clientToken"], "c");
        // A later desired change carries the whole delta, old attributes included.
        let out = update(&mut s, json!({"state":{"desired":{"x":[1,2]}}}));
        let delta = reply(&out, "update/delta").unwrap();
        assert_eq!(
            delta["state"],
            json!({"lights":{"color":{"g":255}},"mode":"eco","x":[1,2]})
        );
        // Reporting the desired values clears the delta in get.
        update(
            &mut s,
            json!({"state":{"reported":{"lights":{"color":{"g":255}},"mode":"eco","x":[1,2]}}}),
        );
        let doc = s.document(&key(), 1).unwrap();
        assert!(doc["state"].get("delta").is_none(), "{doc}");
        // Deleting a reported attribute that is still desired puts it back in the delta.
        update(&mut s, json!({"state":{"reported":{"mode":null}}}));
        let doc = s.document(&key(), 1).unwrap();
        assert_eq!(doc["state"]["delta"], json!({"mode":"eco"}));
    }

    #[test]
    fn arrays_are_values_in_the_delta() {
        let desired = json!({"colors":["RED","GREEN"]});
        let reported = json!({"colors":["RED"]});
        let (d, _) = delta_of(
            desired.as_object().unwrap(),
            reported.as_object(),
            &Map::new(),
        )
        .unwrap();
        assert_eq!(d, json!({"colors":["RED","GREEN"]}));
    }

    #[test]
    fn null_deletes_leaves_sections_and_empty_objects() {
        let mut s = ShadowStore::default();
        update(
            &mut s,
            json!({"state":{"desired":{"a":{"b":1}},"reported":{"c":1,"d":2}}}),
        );
        update(
            &mut s,
            json!({"state":{"desired":{"a":{"b":null}},"reported":{"c":null}}}),
        );
        let doc = s.document(&key(), 1).unwrap();
        assert_eq!(doc["state"], json!({"reported":{"d":2}}));
        assert_eq!(doc["metadata"], json!({"reported":{"d":{"timestamp":100}}}));
        update(&mut s, json!({"state":{"reported":null}}));
        let doc = s.document(&key(), 1).unwrap();
        assert_eq!(doc["state"], json!({}));
        assert_eq!(doc["version"], 3);
    }

    #[test]
    fn version_conflict_is_409_and_a_matching_version_is_accepted() {
        let mut s = ShadowStore::default();
        update(&mut s, json!({"state":{"desired":{"c":["RED"]}}}));
        let out = update(
            &mut s,
            json!({"state":{"desired":{"c":["BLUE"]}},"version":0,"clientToken":"k"}),
        );
        assert_eq!(out.rejected, Some(409));
        assert_eq!(
            reply(&out, "update/rejected").unwrap(),
            &json!({"code":409,"message":"Version conflict","timestamp":100,"clientToken":"k"})
        );
        let out = update(
            &mut s,
            json!({"state":{"desired":{"c":["BLUE"]}},"version":1}),
        );
        assert_eq!(out.version, Some(2));
    }

    #[test]
    fn documented_400s() {
        let mut s = ShadowStore::default();
        let cases: Vec<(&[u8], &str)> = vec![
            (b"{not json", "Invalid JSON"),
            (b"[1]", "Invalid JSON"),
            (br#"{"clientToken":"x"}"#, "Missing required node: state"),
            (br#"{"state":3}"#, "State node must be an object"),
            (
                br#"{"state":{"desired":1}}"#,
                "Desired node must be an object",
            ),
            (
                br#"{"state":{"reported":"x"}}"#,
                "Reported node must be an object",
            ),
            (
                br#"{"state":{"delta":{}}}"#,
                "State contains an invalid node",
            ),
            (
                br#"{"state":{"desired":{"a":[null]}}}"#,
                "State contains an invalid node",
            ),
            (
                br#"{"state":{"desired":{}},"version":"7"}"#,
                "Invalid version",
            ),
            (
                br#"{"state":{"desired":{}},"version":-1}"#,
                "Invalid version",
            ),
            (
                br#"{"state":{"desired":{"a":{"b":{"c":{"d":{"e":{"f":{"g":1}}}}}}}}}"#,
                "JSON contains too many levels of nesting; maximum is 6",
            ),
        ];
        for (payload, msg) in cases {
            let out = s.handle(&key(), ShadowOp::Update, payload, 1, true);
            assert_eq!(
                out.rejected,
                Some(400),
                "{}",
                String::from_utf8_lossy(payload)
            );
            assert_eq!(reply(&out, "update/rejected").unwrap()["message"], msg);
        }
        let long = "t".repeat(65);
        let out = update(&mut s, json!({"state":{"desired":{}},"clientToken":long}));
        assert_eq!(
            reply(&out, "update/rejected").unwrap()["message"],
            "Invalid clientToken"
        );
        // Six levels are fine.
        let out = update(
            &mut s,
            json!({"state":{"desired":{"a":{"b":{"c":{"d":{"e":{"f":1}}}}}}}}),
        );
        assert_eq!(out.rejected, None);
        // Not UTF-8.
        let out = s.handle(&key(), ShadowOp::Update, &[0xff, 0xfe], 1, true);
        assert_eq!(out.rejected, Some(415));
        assert_eq!(s.version(&key()), 1, "rejections do not bump the version");
    }

    #[test]
    fn state_over_8_kb_is_413_and_leaves_the_shadow_unchanged() {
        let mut s = ShadowStore::default();
        update(&mut s, json!({"state":{"reported":{"a":"x".repeat(4000)}}}));
        // Each part fits, together they do not.
        let out = update(
            &mut s,
            json!({"state":{"desired":{"b":"y".repeat(4200)}},"clientToken":"big"}),
        );
        assert_eq!(out.rejected, Some(413));
        let body = reply(&out, "update/rejected").unwrap();
        assert_eq!(
            body["message"],
            "The payload exceeds the maximum size allowed"
        );
        assert_eq!(body["clientToken"], "big");
        assert_eq!(s.version(&key()), 1);
        assert!(
            s.document(&key(), 1).unwrap()["state"]
                .get("desired")
                .is_none()
        );
        // A message over 128 KB is 413 before parsing.
        let huge = vec![b' '; 128 * 1024 + 1];
        assert_eq!(
            s.handle(&key(), ShadowOp::Update, &huge, 1, true).rejected,
            Some(413)
        );
    }

    #[test]
    fn get_and_delete_of_a_missing_shadow_are_404_and_delete_keeps_the_version() {
        let mut s = ShadowStore::default();
        let out = s.handle(&key(), ShadowOp::Get, br#"{"clientToken":"g"}"#, 1, true);
        let body = reply(&out, "get/rejected").unwrap();
        assert_eq!(body["code"], 404);
        assert_eq!(body["clientToken"], "g");
        assert_eq!(body["message"], "No shadow exists with name: 'pump'");
        assert_eq!(
            s.handle(&key(), ShadowOp::Delete, b"", 1, true).rejected,
            Some(404)
        );
        update(&mut s, json!({"state":{"reported":{"a":1}}}));
        update(&mut s, json!({"state":{"reported":{"a":2}}}));
        let out = s.handle(&key(), ShadowOp::Delete, b"", 7, true);
        assert_eq!(
            reply(&out, "delete/accepted").unwrap(),
            &json!({"version":2,"timestamp":7})
        );
        assert!(s.document(&key(), 1).is_none());
        assert_eq!(
            s.handle(&key(), ShadowOp::Get, b"", 1, true).rejected,
            Some(404)
        );
        let out = update(&mut s, json!({"state":{"reported":{"a":3}}}));
        assert_eq!(out.version, Some(3));
    }

    #[test]
    fn get_returns_the_full_document_with_delta() {
        let mut s = ShadowStore::default();
        let named = ShadowKey::new("pump", Some("cfg"));
        s.handle(
            &named,
            ShadowOp::Update,
            br#"{"state":{"desired":{"a":1},"reported":{"a":0,"b":2}}}"#,
            9,
            true,
        );
        let out = s.handle(&named, ShadowOp::Get, br#"{"clientToken":"q"}"#, 10, true);
        let doc = reply(&out, "get/accepted").unwrap();
        assert_eq!(
            doc["state"],
            json!({"desired":{"a":1},"reported":{"a":0,"b":2},"delta":{"a":1}})
        );
        assert_eq!(doc["metadata"]["desired"]["a"]["timestamp"], 9);
        assert_eq!(doc["clientToken"], "q");
        assert_eq!(doc["timestamp"], 10);
        assert!(
            s.document(&key(), 1).is_none(),
            "classic and named are separate"
        );
        assert_eq!(named.topic_prefix(), "$aws/things/pump/shadow/name/cfg");
    }

    #[test]
    fn injected_errors_reject_the_next_device_updates_only() {
        let mut s = ShadowStore::default();
        s.inject_update_errors(&key(), 503, 2);
        let body = br#"{"state":{"reported":{"a":1}},"clientToken":"i"}"#;
        let cloud = s.handle(
            &key(),
            ShadowOp::Update,
            br#"{"state":{"desired":{"a":1}}}"#,
            1,
            false,
        );
        assert_eq!(cloud.rejected, None);
        for _ in 0..2 {
            let out = s.handle(&key(), ShadowOp::Update, body, 1, true);
            assert_eq!(out.rejected, Some(503));
            assert_eq!(reply(&out, "update/rejected").unwrap()["clientToken"], "i");
        }
        assert_eq!(
            s.handle(&key(), ShadowOp::Update, body, 1, true).rejected,
            None
        );
    }

    #[test]
    fn the_shadow_cap_is_a_500() {
        let mut s = ShadowStore::new(ShadowLimits {
            max_shadows: 1,
            ..ShadowLimits::default()
        });
        update(&mut s, json!({"state":{"reported":{"a":1}}}));
        let other = ShadowKey::new("other", None);
        let out = s.handle(
            &other,
            ShadowOp::Update,
            br#"{"state":{"reported":{"a":1}}}"#,
            1,
            true,
        );
        assert_eq!(out.rejected, Some(500));
    }
}
