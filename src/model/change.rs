//! A device-state change as local programs report it, and the rules every change obeys
//! (docs/PROTOCOL.md §5): keys are 1-128 chars of `[A-Za-z0-9_.-]`, a value is any JSON-compatible
//! value of at most 64 KiB encoded (CBOR, the outbox's on-disk encoding).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Largest encoded value of one change.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// Longest key.
pub const MAX_KEY_LEN: usize = 128;

/// One change as submitted: validated and encoded, not yet sequenced.
#[derive(Debug, Clone, PartialEq)]
pub struct NewChange {
    pub key: String,
    /// The value, CBOR-encoded.
    pub value: Vec<u8>,
    /// Unix ms; `None` = stamped by the store when it takes the change.
    pub ts: Option<u64>,
    /// Who made the change.
    pub origin: Origin,
}

/// Who made a change: the device (reported over the socket), or the agent applying the
/// cloud's desired state or a rollback.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    #[default]
    Device,
    Cloud,
    Rollback,
}

impl Origin {
    /// The name written into records and batches; `None` for the device (the default).
    pub fn tag(self) -> Option<&'static str> {
        match self {
            Origin::Device => None,
            Origin::Cloud => Some("cloud"),
            Origin::Rollback => Some("rollback"),
        }
    }

    pub fn from_tag(tag: Option<&str>) -> Origin {
        match tag {
            Some("cloud") => Origin::Cloud,
            Some("rollback") => Origin::Rollback,
            _ => Origin::Device,
        }
    }
}

/// A change as it arrives in a local request, before validation.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(from = "WireChange")]
pub struct RawChange {
    pub key: String,
    /// Required: `null` removes the key, so a forgotten field must not mean "remove".
    pub value: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ts: Option<u64>,
    /// An integer literal of the value's JSON text beyond 64 bits: JSON parsing made it a
    /// float (silently changed data), so [`Self::validate`] refuses the change.
    #[serde(skip)]
    wide_integer: Option<String>,
}

/// [`RawChange`] as it is read.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireChange {
    key: String,
    value: ExactValue,
    #[serde(default)]
    ts: Option<u64>,
}

impl From<WireChange> for RawChange {
    fn from(w: WireChange) -> Self {
        RawChange {
            key: w.key,
            value: w.value.value,
            ts: w.ts,
            wide_integer: w.value.wide_integer,
        }
    }
}

/// A JSON value read with a look at its text for integers beyond 64 bits.
struct ExactValue {
    value: serde_json::Value,
    wide_integer: Option<String>,
}

impl<'de> Deserialize<'de> for ExactValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Box::<serde_json::value::RawValue>::deserialize(d)?;
        let text = raw.get();
        let value = serde_json::from_str(text).map_err(serde::de::Error::custom)?;
        Ok(ExactValue {
            wide_integer: wide_integer(text).map(|lit| truncate(lit, 64)),
            value,
        })
    }
}

/// The first integer literal in JSON `text` (outside strings) that no 64-bit integer holds:
/// `serde_json` turns it into a float, losing digits. Floats (with `.` or an exponent) are
/// floats by their writer's choice and not reported.
pub fn wide_integer(text: &str) -> Option<&str> {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                // Skip the string, escapes included.
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                i += 1;
                while i < bytes.len()
                    && matches!(bytes[i], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-')
                {
                    i += 1;
                }
                let lit = &text[start..i];
                let integer = !lit.contains(['.', 'e', 'E']);
                if integer && lit.parse::<u64>().is_err() && lit.parse::<i64>().is_err() {
                    return Some(lit);
                }
            }
            _ => i += 1,
        }
    }
    None
}

/// Why a change is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    #[error("key {0:?} is invalid: keys are 1-128 characters of A-Z a-z 0-9 _ . -")]
    BadKey(String),
    #[error("value of key {key:?} is {len} bytes encoded; the limit is 65536")]
    ValueTooLarge { key: String, len: usize },
    #[error("value of key {key:?} cannot be encoded: {reason}")]
    Encode { key: String, reason: String },
    #[error(
        "value of key {key:?} holds the integer {literal}, beyond the 64-bit range: it would \
         be stored as a float, losing digits; send it as a string"
    )]
    WideInteger { key: String, literal: String },
    #[error(
        "ts of key {key:?} is {ts}, more than {ahead} ahead of this device's clock ({now}); \
         the limit is desired.max_future_ts (a ts from the future would win every \
         last-write-wins conflict against the cloud)"
    )]
    FutureTs {
        key: String,
        ts: u64,
        now: u64,
        ahead: String,
    },
}

/// Checks a key against docs/PROTOCOL.md §5.
pub fn validate_key(key: &str) -> Result<(), ChangeError> {
    let ok = !key.is_empty()
        && key.len() <= MAX_KEY_LEN
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ChangeError::BadKey(truncate(key, 140)))
    }
}

impl RawChange {
    /// A change of `key` to `value`, at the time the store takes it.
    pub fn new(key: impl Into<String>, value: serde_json::Value) -> RawChange {
        RawChange {
            key: key.into(),
            value,
            ts: None,
            wide_integer: None,
        }
    }

    /// Validates as [`Self::validate`] does, and refuses a `ts` more than `max_future` ahead
    /// of `now` (Unix ms): what the daemon takes in.
    pub fn validate_at(self, now: u64, max_future: Duration) -> Result<NewChange, ChangeError> {
        if let Some(ts) = self.ts
            && ts > now.saturating_add(duration_ms(max_future))
        {
            validate_key(&self.key)?;
            return Err(ChangeError::FutureTs {
                key: self.key,
                ts,
                now,
                ahead: crate::model::text::human_duration(duration_ms(max_future)),
            });
        }
        self.validate()
    }

    /// Validates the key and encodes the value.
    pub fn validate(self) -> Result<NewChange, ChangeError> {
        validate_key(&self.key)?;
        if let Some(literal) = self.wide_integer {
            return Err(ChangeError::WideInteger {
                key: self.key,
                literal,
            });
        }
        let value = encode_value(&self.key, &self.value)?;
        Ok(NewChange {
            key: self.key,
            value,
            ts: self.ts,
            origin: Origin::Device,
        })
    }
}

/// CBOR-encodes a value, enforcing the size limit.
pub fn encode_value(key: &str, value: &serde_json::Value) -> Result<Vec<u8>, ChangeError> {
    // Sized for a string (the usual value: its bytes and a CBOR head of at most 9), so it
    // is not grown by doubling: reports in flight take less memory (issue 16).
    let cap = match value {
        serde_json::Value::String(s) => s.len() + 9,
        _ => 16,
    };
    let mut out = Vec::with_capacity(cap);
    ciborium::into_writer(value, &mut out).map_err(|e| ChangeError::Encode {
        key: key.to_owned(),
        reason: e.to_string(),
    })?;
    if out.len() > MAX_VALUE_BYTES {
        return Err(ChangeError::ValueTooLarge {
            key: key.to_owned(),
            len: out.len(),
        });
    }
    Ok(out)
}

/// A stored value that does not decode; its text is the CBOR decoder's.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct DecodeError(#[from] ciborium::de::Error<std::io::Error>);

/// Decodes a CBOR value written by [`encode_value`] back to JSON.
pub fn decode_value(cbor: &[u8]) -> Result<serde_json::Value, DecodeError> {
    Ok(ciborium::from_reader(cbor)?)
}

/// Parses a CLI `KEY=VALUE` argument: VALUE as JSON, else as a string.
pub fn parse_assignment(arg: &str) -> Result<RawChange, String> {
    let (key, text) = arg
        .split_once('=')
        .ok_or_else(|| format!("{arg:?} is not KEY=VALUE"))?;
    let (value, wide) = match serde_json::from_str(text) {
        Ok(v) => (v, wide_integer(text).map(|lit| truncate(lit, 64))),
        Err(_) => (serde_json::Value::String(text.to_owned()), None),
    };
    if let Some(literal) = wide {
        return Err(ChangeError::WideInteger {
            key: key.to_owned(),
            literal,
        }
        .to_string());
    }
    Ok(RawChange::new(key, value))
}

/// A duration in whole milliseconds (saturating).
pub fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_follow_spec_charset_and_length() {
        for ok in ["a", "temp", "led.mode", "A_b-9.z", &"k".repeat(128)] {
            assert!(validate_key(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "a/b", "é", "a+b", "#", &"k".repeat(129)] {
            assert!(validate_key(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn value_limit_is_64_kib_encoded() {
        let fits = json!("x".repeat(MAX_VALUE_BYTES - 5));
        assert!(encode_value("k", &fits).is_ok());
        let too_big = json!("x".repeat(MAX_VALUE_BYTES));
        let err = encode_value("k", &too_big).unwrap_err();
        assert!(matches!(err, ChangeError::ValueTooLarge { .. }));
    }

    #[test]
    fn values_round_trip_through_cbor() {
        for v in [
            json!(null),
            json!(true),
            json!(21.5),
            json!(-3),
            json!(u64::MAX),
            json!("eco"),
            json!({"a": [1, 2, {"b": null}]}),
        ] {
            let enc = encode_value("k", &v).unwrap();
            assert_eq!(decode_value(&enc).unwrap(), v);
        }
    }

    #[test]
    fn a_ts_beyond_the_tolerance_is_refused_naming_the_key() {
        let raw = |ts| RawChange {
            key: "led".into(),
            value: json!(1),
            ts,
            wide_integer: None,
        };
        let hour = Duration::from_secs(3600);
        let now = 1_764_150_000_000;
        for ok in [None, Some(0), Some(now), Some(now + 3_600_000)] {
            assert!(raw(ok).validate_at(now, hour).is_ok(), "{ok:?}");
        }
        for bad in [now + 3_600_001, u64::MAX] {
            let e = raw(Some(bad)).validate_at(now, hour).unwrap_err();
            assert!(
                matches!(e, ChangeError::FutureTs { ts, .. } if ts == bad),
                "{e}"
            );
            let m = e.to_string();
            assert!(m.contains("\"led\"") && m.contains("max_future_ts"), "{m}");
        }
        // The key is checked first: a bad key is reported as such.
        let mut bad_key = raw(Some(u64::MAX));
        bad_key.key = "a b".into();
        assert!(matches!(
            bad_key.validate_at(now, hour),
            Err(ChangeError::BadKey(_))
        ));
    }

    #[test]
    fn an_integer_beyond_64_bits_is_refused_naming_the_key() {
        let big = "123456789012345678901234567890";
        for text in [
            format!(r#"{{"key": "n", "value": {big}}}"#),
            format!(r#"{{"key": "n", "value": {{"a": ["x", -{big}]}}}}"#),
            r#"{"key": "n", "value": 18446744073709551616}"#.to_owned(),
            r#"{"key": "n", "value": -9223372036854775809}"#.to_owned(),
        ] {
            let raw: RawChange = serde_json::from_str(&text).unwrap();
            let e = raw.validate().unwrap_err();
            assert!(
                matches!(&e, ChangeError::WideInteger { key, .. } if key == "n"),
                "{text}: {e}"
            );
            assert!(e.to_string().contains("send it as a string"), "{e}");
        }
        // What 64 bits hold, floats, and digits inside strings are fine.
        for ok in [
            r#"{"key": "n", "value": 18446744073709551615}"#,
            r#"{"key": "n", "value": -9223372036854775808}"#,
            r#"{"key": "n", "value": [1e300, 6.022e23, 0.5, -1.5E-7]}"#,
            r#"{"key": "n", "value": "123456789012345678901234567890"}"#,
            r#"{"key": "n", "value": {"123456789012345678901234567890": "\\\"1"}}"#,
        ] {
            let raw: RawChange = serde_json::from_str(ok).unwrap();
            assert!(raw.validate().is_ok(), "{ok}");
        }
        // Deserialized through a Value too (the raw text is the Value's).
        let v: serde_json::Value = serde_json::from_str(r#"{"key": "n", "value": 7}"#).unwrap();
        let raw: RawChange = serde_json::from_value(v).unwrap();
        assert_eq!(raw.value, json!(7));
        // Unknown fields and a missing value are still refused.
        assert!(serde_json::from_str::<RawChange>(r#"{"key": "n", "value": 1, "x": 2}"#).is_err());
        assert!(serde_json::from_str::<RawChange>(r#"{"key": "n"}"#).is_err());
        // The CLI's KEY=VALUE.
        let e = parse_assignment(&format!("n={big}")).unwrap_err();
        assert!(e.contains("\"n\"") && e.contains("64-bit"), "{e}");
        assert_eq!(parse_assignment("n=12").unwrap().value, json!(12));
    }

    #[test]
    fn assignment_value_is_json_else_string() {
        assert_eq!(parse_assignment("temp=21.5").unwrap().value, json!(21.5));
        assert_eq!(parse_assignment("mode=eco").unwrap().value, json!("eco"));
        assert_eq!(parse_assignment("on=true").unwrap().value, json!(true));
        assert_eq!(parse_assignment("s=\"1\"").unwrap().value, json!("1"));
        assert_eq!(parse_assignment("e=").unwrap().value, json!(""));
        assert_eq!(parse_assignment("x=a=b").unwrap().value, json!("a=b"));
        assert!(parse_assignment("novalue").is_err());
    }
}
