//! The device twin as IoT Hub keeps it for one device, without sockets: the device's GET and
//! reported PATCH in (payload bytes), status codes and versions out; the service side's desired
//! patches with the notification body they produce. [`super::IotHub`] wires it to MQTT.
//!
//! Sources:
//! - <https://learn.microsoft.com/azure/iot/iot-mqtt-connect-to-iot-hub>: GET answers `200`
//!   with `{"desired":{..,"$version"},"reported":{..,"$version"}}`, `429`, `5xx`; PATCH answers
//!   `204` with the new reported `$version`, `400` (malformed), `429`, `5xx`; members merge,
//!   `null` deletes; desired notifications carry the patch plus `$version`.
//! - <https://learn.microsoft.com/azure/iot-hub/iot-hub-devguide-device-twins>: key rules (UTF-8,
//!   up to 1 KB, no control characters, `.`, `$` or SP), values (integers within ±2^52, strings
//!   up to 4 KB, arrays allowed), depth 10, 32 KB per section computed from keys and values
//!   (numbers 8 bytes, booleans 4, strings by characters without control characters), versions
//!   always increase.

use std::fmt;

use serde_json::{Map, Value};

/// The documented limits; `Default` is IoT Hub's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TwinLimits {
    /// Size of `desired` and of `reported` each, computed as the twin page says.
    pub max_section_bytes: usize,
    /// Object levels below a section's root (`{"a":{"b":1}}` is 1).
    pub max_depth: usize,
    /// Bytes of a key.
    pub max_key_bytes: usize,
    /// Bytes of a string value.
    pub max_string_bytes: usize,
    /// Integer range.
    pub min_int: i64,
    pub max_int: i64,
    /// Status of a PATCH that would make `reported` too large. The MQTT page lists only
    /// 204/400/429/5xx for a PATCH, so 400; a user-reported live answer was errorCode 403100
    /// ("'Properties.Reported' size should be less than 32768 bytes",
    /// <https://github.com/Azure/iotedge/issues/7035>), so a device should treat every 4xx
    /// but 429 alike.
    pub oversize_status: u16,
}

impl Default for TwinLimits {
    fn default() -> Self {
        TwinLimits {
            max_section_bytes: 32 * 1024,
            max_depth: 10,
            max_key_bytes: 1024,
            max_string_bytes: 4 * 1024,
            min_int: -4_503_599_627_370_496,
            max_int: 4_503_599_627_370_495,
            oversize_status: 400,
        }
    }
}

/// A rejected request or service call: the status IoT Hub answers and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubError {
    pub status: u16,
    pub message: String,
}

impl HubError {
    pub fn new(status: u16, message: impl Into<String>) -> HubError {
        HubError {
            status,
            message: message.into(),
        }
    }
}

impl fmt::Display for HubError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IoT Hub answered {}: {}", self.status, self.message)
    }
}

impl std::error::Error for HubError {}

/// A device request on the twin topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TwinOp {
    /// `$iothub/twin/GET/?$rid=..`
    Get,
    /// `$iothub/twin/PATCH/properties/reported/?$rid=..`
    PatchReported,
}

/// The answer to one device request (`$iothub/twin/res/{status}/?$rid=..[&$version=..]`).
#[derive(Debug, Clone, PartialEq)]
pub struct TwinReply {
    pub status: u16,
    /// The GET's body (`None`: empty body).
    pub body: Option<Value>,
    /// The new reported version of an accepted PATCH (`$version` in the response topic).
    pub version: Option<u64>,
    /// Why a request was rejected.
    pub reason: Option<String>,
}

impl TwinReply {
    fn rejected(status: u16, reason: impl Into<String>) -> TwinReply {
        TwinReply {
            status,
            body: None,
            version: None,
            reason: Some(reason.into()),
        }
    }
}

/// One device's twin: both property sections with their versions, and injected failures.
#[derive(Debug, Clone)]
pub struct TwinStore {
    limits: TwinLimits,
    desired: Map<String, Value>,
    reported: Map<String, Value>,
    desired_version: u64,
    reported_version: u64,
    /// The next `n` device requests are answered with this status.
    injected: Option<(u16, usize)>,
}

impl Default for TwinStore {
    fn default() -> Self {
        TwinStore::new(TwinLimits::default())
    }
}

impl TwinStore {
    /// An empty twin. Both versions start at 1, as a newly created device's twin shows them
    /// (the docs only promise that versions increase).
    pub fn new(limits: TwinLimits) -> TwinStore {
        TwinStore {
            limits,
            desired: Map::new(),
            reported: Map::new(),
            desired_version: 1,
            reported_version: 1,
            injected: None,
        }
    }

    pub fn desired_version(&self) -> u64 {
        self.desired_version
    }

    pub fn reported_version(&self) -> u64 {
        self.reported_version
    }

    /// The next `count` device requests (GET or PATCH) are answered `status` (429, 500, 503,
    /// ...) and change nothing; `count` 0 clears.
    pub fn inject(&mut self, status: u16, count: usize) {
        self.injected = (count > 0).then_some((status, count));
    }

    /// Device requests still to be failed by [`inject`](Self::inject).
    pub fn injected_left(&self) -> usize {
        self.injected.map_or(0, |(_, n)| n)
    }

    /// The body of a GET answer: `{"desired":{..,"$version":N},"reported":{..,"$version":M}}`.
    pub fn properties(&self) -> Value {
        let mut o = Map::new();
        o.insert("desired".into(), self.desired_section());
        o.insert("reported".into(), self.reported_section());
        Value::Object(o)
    }

    /// `desired` with its `$version`.
    pub fn desired_section(&self) -> Value {
        with_version(&self.desired, self.desired_version)
    }

    /// `reported` with its `$version`.
    pub fn reported_section(&self) -> Value {
        with_version(&self.reported, self.reported_version)
    }

    /// Answers one device request; consumes an injected failure first.
    pub fn handle(&mut self, op: TwinOp, payload: &[u8]) -> TwinReply {
        if let Some((status, left)) = self.injected.as_mut() {
            let status = *status;
            *left -= 1;
            if *left == 0 {
                self.injected = None;
            }
            return TwinReply::rejected(status, "injected failure");
        }
        match op {
            // A GET carries an empty body; anything in it is ignored.
            TwinOp::Get => TwinReply {
                status: 200,
                body: Some(self.properties()),
                version: None,
                reason: None,
            },
            TwinOp::PatchReported => match self.patch_reported(payload) {
                Ok(v) => TwinReply {
                    status: 204,
                    body: None,
                    version: Some(v),
                    reason: None,
                },
                Err(e) => TwinReply::rejected(e.status, e.message),
            },
        }
    }

    /// Merges a reported patch (the PATCH body); returns the new reported version.
    pub fn patch_reported(&mut self, payload: &[u8]) -> Result<u64, HubError> {
        let patch = parse_patch(payload)?;
        self.reported = self.merged(&self.reported, &patch)?;
        self.reported_version += 1;
        Ok(self.reported_version)
    }

    /// The service side's partial update of `desired`: returns the new desired version and the
    /// notification body (the patch plus `"$version"`).
    pub fn update_desired(&mut self, patch: &Value) -> Result<(u64, Value), HubError> {
        let Some(patch) = patch.as_object() else {
            return Err(HubError::new(400, "a desired patch must be a JSON object"));
        };
        self.desired = self.merged(&self.desired, patch)?;
        self.desired_version += 1;
        Ok((
            self.desired_version,
            with_version(patch, self.desired_version),
        ))
    }

    /// The service side's "replace desired properties": the notification body is the whole
    /// new document plus `"$version"` (the device gets "the same form of update").
    pub fn replace_desired(&mut self, doc: &Value) -> Result<(u64, Value), HubError> {
        let Some(doc) = doc.as_object() else {
            return Err(HubError::new(
                400,
                "desired properties must be a JSON object",
            ));
        };
        let replaced = self.merged(&Map::new(), doc)?;
        self.desired = replaced;
        self.desired_version += 1;
        Ok((
            self.desired_version,
            with_version(&self.desired, self.desired_version),
        ))
    }

    /// `base` with `patch` merged in, if the patch and the result are within the limits.
    fn merged(
        &self,
        base: &Map<String, Value>,
        patch: &Map<String, Value>,
    ) -> Result<Map<String, Value>, HubError> {
        validate(&self.limits, patch)?;
        let mut out = base.clone();
        merge(&mut out, patch);
        let size = section_size(&out);
        if size > self.limits.max_section_bytes {
            return Err(HubError::new(
                self.limits.oversize_status,
                format!(
                    "section size {size} bytes over the limit of {} bytes",
                    self.limits.max_section_bytes
                ),
            ));
        }
        Ok(out)
    }
}

fn with_version(section: &Map<String, Value>, version: u64) -> Value {
    let mut o = section.clone();
    o.insert("$version".into(), Value::from(version));
    Value::Object(o)
}

fn parse_patch(payload: &[u8]) -> Result<Map<String, Value>, HubError> {
    match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(HubError::new(400, "the patch is not a JSON object")),
        Err(e) => Err(HubError::new(400, format!("malformed JSON: {e}"))),
    }
}

/// Merges `patch` into `target`: `null` deletes a member, objects merge recursively, anything
/// else (arrays included) replaces. Objects left empty stay (the docs do not say otherwise).
pub fn merge(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (k, v) in patch {
        match v {
            Value::Null => {
                target.remove(k);
            }
            Value::Object(p) => {
                let slot = target
                    .entry(k.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !slot.is_object() {
                    *slot = Value::Object(Map::new());
                }
                if let Value::Object(t) = slot {
                    merge(t, p);
                }
            }
            other => {
                target.insert(k.clone(), other.clone());
            }
        }
    }
}

/// Checks a patch (or a whole section) against the key, value and depth rules; the error is
/// a 400 naming the first offence.
pub fn validate(limits: &TwinLimits, section: &Map<String, Value>) -> Result<(), HubError> {
    let depth = object_depth(section);
    if depth > limits.max_depth {
        return Err(HubError::new(
            400,
            format!(
                "nesting depth {depth} over the limit of {}",
                limits.max_depth
            ),
        ));
    }
    check_members(limits, section)
}

fn check_members(limits: &TwinLimits, o: &Map<String, Value>) -> Result<(), HubError> {
    for (k, v) in o {
        check_key(limits, k)?;
        check_value(limits, k, v)?;
    }
    Ok(())
}

/// A key's documented rules: at most 1 KB, no control characters, `.`, `$` or space.
pub fn check_key(limits: &TwinLimits, key: &str) -> Result<(), HubError> {
    if key.len() > limits.max_key_bytes {
        return Err(HubError::new(
            400,
            format!(
                "key of {} bytes over the limit of {}",
                key.len(),
                limits.max_key_bytes
            ),
        ));
    }
    if let Some(c) = key
        .chars()
        .find(|c| c.is_control() || matches!(c, '.' | '$' | ' '))
    {
        return Err(HubError::new(
            400,
            format!("key {key:?} holds the forbidden character {c:?}"),
        ));
    }
    Ok(())
}

fn check_value(limits: &TwinLimits, key: &str, v: &Value) -> Result<(), HubError> {
    match v {
        Value::Object(o) => check_members(limits, o),
        Value::Array(a) => a.iter().try_for_each(|x| check_value(limits, key, x)),
        Value::String(s) if s.len() > limits.max_string_bytes => Err(HubError::new(
            400,
            format!(
                "string of {} bytes under {key:?} over the limit of {}",
                s.len(),
                limits.max_string_bytes
            ),
        )),
        Value::Number(n) if !n.is_f64() => {
            let ok = n
                .as_i64()
                .is_some_and(|i| (limits.min_int..=limits.max_int).contains(&i));
            if ok {
                Ok(())
            } else {
                Err(HubError::new(
                    400,
                    format!("integer {n} under {key:?} out of range"),
                ))
            }
        }
        _ => Ok(()),
    }
}

/// Object levels below `o` (`{"a":1}` is 0, `{"a":{"b":1}}` is 1); objects inside arrays
/// count as levels, the arrays themselves do not.
pub fn object_depth(o: &Map<String, Value>) -> usize {
    fn levels(v: &Value) -> usize {
        match v {
            Value::Object(o) => 1 + o.values().map(levels).max().unwrap_or(0),
            Value::Array(a) => a.iter().map(levels).max().unwrap_or(0),
            _ => 0,
        }
    }
    o.values().map(levels).max().unwrap_or(0)
}

/// A section's size as the twin page computes it: each key's and value's length, numbers 8
/// bytes, booleans 4, strings by characters without control characters, nested objects by
/// their contents. Arrays count their elements (the page does not say), `null` 0.
pub fn section_size(o: &Map<String, Value>) -> usize {
    fn chars(s: &str) -> usize {
        s.chars().filter(|c| !c.is_control()).count()
    }
    fn value(v: &Value) -> usize {
        match v {
            Value::Null => 0,
            Value::Bool(_) => 4,
            Value::Number(_) => 8,
            Value::String(s) => chars(s),
            Value::Array(a) => a.iter().map(value).sum(),
            Value::Object(o) => section_size(o),
        }
    }
    o.iter().map(|(k, v)| chars(k) + value(v)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(o) => o,
            _ => Map::new(),
        }
    }

    fn patch(t: &mut TwinStore, v: Value) -> TwinReply {
        t.handle(TwinOp::PatchReported, v.to_string().as_bytes())
    }

    #[test]
    fn a_new_twin_has_empty_sections_at_version_1() {
        let mut t = TwinStore::default();
        let r = t.handle(TwinOp::Get, b"");
        assert_eq!(r.status, 200);
        assert_eq!(
            r.body,
            Some(json!({"desired":{"$version":1},"reported":{"$version":1}}))
        );
    }

    #[test]
    fn reported_patches_merge_delete_with_null_and_bump_the_version() {
        let mut t = TwinStore::default();
        let r = patch(&mut t, json!({"fw":"1.0","net":{"kind":"wifi","rssi":-60}}));
        assert_eq!((r.status, r.version), (204, Some(2)));
        let r = patch(
            &mut t,
            json!({"fw":null,"net":{"rssi":-70,"ssid":"x"},"n":1}),
        );
        assert_eq!((r.status, r.version), (204, Some(3)));
        assert_eq!(
            t.reported_section(),
            json!({"net":{"kind":"wifi","rssi":-70,"ssid":"x"},"n":1,"$version":3})
        );
        // A nested null deletes inside the object; an empty object stays.
        patch(&mut t, json!({"net":{"kind":null,"rssi":null,"ssid":null}}));
        assert_eq!(t.reported_section()["net"], json!({}));
        // A scalar replaced by an object, an object by an array.
        patch(&mut t, json!({"n":{"a":1},"net":[1,{"b":2}]}));
        assert_eq!(t.reported_section()["n"], json!({"a":1}));
        assert_eq!(t.reported_section()["net"], json!([1, {"b":2}]));
        assert_eq!(t.reported_version(), 5);
        assert_eq!(
            t.desired_version(),
            1,
            "reported patches leave desired alone"
        );
    }

    #[test]
    fn malformed_patches_are_400_and_change_nothing() {
        let mut t = TwinStore::default();
        for body in [
            &b"not json"[..],
            b"",
            b"[1,2]",
            b"42",
            b"\"s\"",
            b"null",
            b"\xff",
        ] {
            let r = t.handle(TwinOp::PatchReported, body);
            assert_eq!(r.status, 400, "{body:?}");
            assert!(r.reason.is_some());
        }
        assert_eq!(t.reported_version(), 1);
    }

    #[test]
    fn key_rules_are_400() {
        let mut t = TwinStore::default();
        let long = "k".repeat(1025);
        for bad in [
            json!({"a.b":1}),
            json!({"$x":1}),
            json!({"a b":1}),
            json!({"a\u{1}":1}),
            json!({"a\u{85}":1}),
            json!({"ok":{"x.y":1}}),
            json!({"ok":[{"$v":1}]}),
            json!({long.clone(): 1}),
        ] {
            assert_eq!(patch(&mut t, bad.clone()).status, 400, "{bad}");
        }
        assert_eq!(patch(&mut t, json!({"k".repeat(1024): 1})).status, 204);
        assert_eq!(patch(&mut t, json!({"ünïcode-_:#@":1})).status, 204);
    }

    #[test]
    fn value_rules_are_400() {
        let mut t = TwinStore::default();
        assert_eq!(patch(&mut t, json!({"s":"x".repeat(4097)})).status, 400);
        assert_eq!(patch(&mut t, json!({"s":"x".repeat(4096)})).status, 204);
        assert_eq!(
            patch(&mut t, json!({"i": 4_503_599_627_370_496_i64})).status,
            400
        );
        assert_eq!(
            patch(&mut t, json!({"i": -4_503_599_627_370_497_i64})).status,
            400
        );
        assert_eq!(patch(&mut t, json!({"i": u64::MAX})).status, 400);
        assert_eq!(
            patch(
                &mut t,
                json!({"i": 4_503_599_627_370_495_i64, "f": 1.5e300})
            )
            .status,
            204
        );
    }

    /// The twin page's example: ten nested objects below the section root are valid.
    #[test]
    fn depth_10_is_accepted_and_11_rejected() {
        fn nested(levels: usize) -> Value {
            let mut v = json!({"property": "value"});
            for i in (1..levels).rev() {
                v = json!({ format!("l{i}"): v });
            }
            json!({"l0": v})
        }
        assert_eq!(object_depth(&obj(nested(10))), 10);
        let mut t = TwinStore::default();
        assert_eq!(patch(&mut t, nested(10)).status, 204);
        assert_eq!(patch(&mut t, nested(11)).status, 400);
        assert_eq!(object_depth(&obj(json!({"a":1}))), 0);
        assert_eq!(object_depth(&obj(json!({"a":[{"b":{}}]}))), 2);
    }

    #[test]
    fn size_follows_the_documented_computation() {
        assert_eq!(section_size(&obj(json!({"ab":"xyz"}))), 5);
        assert_eq!(section_size(&obj(json!({"n":1,"b":true}))), 1 + 8 + 1 + 4);
        assert_eq!(section_size(&obj(json!({"o":{"k":"v"}}))), 3);
        assert_eq!(section_size(&obj(json!({"é":"a\u{1}"}))), 2);
        assert_eq!(section_size(&obj(json!({"a":[1,"xy"]}))), 1 + 8 + 2);
    }

    #[test]
    fn a_reported_section_over_32_kb_is_rejected_and_unchanged() {
        let mut t = TwinStore::default();
        // 8 keys of 4 chars + 4,000 chars = 32,032 bytes: within.
        let mut big = Map::new();
        for i in 0..8 {
            big.insert(format!("k{i:03}"), Value::String("x".repeat(4000)));
        }
        assert_eq!(patch(&mut t, Value::Object(big)).status, 204);
        let before = t.reported_section();
        // 736 more bytes make 32,768 (allowed); one more is over.
        let r = patch(&mut t, json!({"k100": "y".repeat(732)}));
        assert_eq!(r.status, 204, "{r:?}");
        let before2 = t.reported_section();
        assert_ne!(before, before2);
        let r = patch(&mut t, json!({"k101": "z"}));
        assert_eq!(r.status, 400);
        assert!(r.reason.as_deref().unwrap_or("").contains("32768"), "{r:?}");
        assert_eq!(t.reported_section(), before2);
        // Deleting makes room again.
        assert_eq!(
            patch(&mut t, json!({"k000": null, "k101": "z"})).status,
            204
        );
        // The status is configurable (403 as reported live).
        let mut t = TwinStore::new(TwinLimits {
            max_section_bytes: 10,
            oversize_status: 403,
            ..TwinLimits::default()
        });
        assert_eq!(patch(&mut t, json!({"k":"0123456789"})).status, 403);
    }

    #[test]
    fn injected_failures_answer_the_next_requests_then_stop() {
        let mut t = TwinStore::default();
        t.inject(429, 2);
        assert_eq!(t.handle(TwinOp::Get, b"").status, 429);
        assert_eq!(patch(&mut t, json!({"a":1})).status, 429);
        assert_eq!(t.injected_left(), 0);
        assert_eq!(t.reported_version(), 1, "a throttled PATCH changes nothing");
        assert_eq!(patch(&mut t, json!({"a":1})).status, 204);
        t.inject(503, 5);
        assert_eq!(t.handle(TwinOp::Get, b"").status, 503);
        t.inject(503, 0);
        assert_eq!(t.handle(TwinOp::Get, b"").status, 200);
    }

    #[test]
    fn desired_updates_bump_the_version_and_notify_the_patch_with_its_version() {
        let mut t = TwinStore::default();
        let (v, body) = t
            .update_desired(&json!({"rate":5,"cfg":{"a":1,"b":2}}))
            .unwrap();
        assert_eq!(v, 2);
        assert_eq!(body, json!({"rate":5,"cfg":{"a":1,"b":2},"$version":2}));
        let (v, body) = t.update_desired(&json!({"cfg":{"a":null}})).unwrap();
        assert_eq!(v, 3);
        assert_eq!(body, json!({"cfg":{"a":null},"$version":3}));
        assert_eq!(
            t.desired_section(),
            json!({"rate":5,"cfg":{"b":2},"$version":3})
        );
        // Rejections leave the version alone.
        assert_eq!(t.update_desired(&json!({"a.b":1})).unwrap_err().status, 400);
        assert_eq!(t.update_desired(&json!([1])).unwrap_err().status, 400);
        assert_eq!(t.desired_version(), 3);
        // Injected failures are for device requests only.
        t.inject(429, 1);
        assert!(t.update_desired(&json!({"x":1})).is_ok());
        assert_eq!(t.injected_left(), 1);
        // Replace: the whole document is the notification.
        let (v, body) = t.replace_desired(&json!({"only":true})).unwrap();
        assert_eq!(v, 5);
        assert_eq!(body, json!({"only":true,"$version":5}));
        assert_eq!(t.properties()["desired"], body);
    }
}
