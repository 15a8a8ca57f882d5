//! Payload encodings, and decoding the desired document (docs/PROTOCOL.md §5) from CBOR or JSON, safely.
//!
//! Both encodings are first read into a generic CBOR value tree (which keeps duplicate map
//! keys, unlike a JSON map), then converted to JSON values under strict rules: text map keys
//! only, no duplicate keys at any depth, no byte strings or tags, finite numbers only, and a
//! bounded nesting depth. A document-level problem rejects the whole document; a problem
//! with one key (bad name, value too deep or too large) rejects only that key.

use ciborium::Value as Cbor;
use serde_json::Value;

/// A payload's encoding: of reported batches (`sync.encoding`), of desired documents and
/// command requests (recognised by their first byte), and of the answers to them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// `"cbor"`
    Cbor,
    /// `"json"`
    Json,
}

/// A decoded desired document.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub version: u64,
    /// When the cloud issued it (Unix ms), if it said.
    pub ts: Option<u64>,
    /// Each key with its value, or why the key is refused.
    pub state: Vec<(String, Result<Value, String>)>,
    pub encoding: Encoding,
}

/// Why a whole document is refused. `version` is set when it could be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct DocError {
    pub version: Option<u64>,
    pub reason: String,
    pub encoding: Encoding,
}

/// Limits from `[desired]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bytes: usize,
    pub max_depth: usize,
}

/// The encoding of an incoming payload (docs/PROTOCOL.md §4): JSON when the first non-whitespace byte is
/// `{`, else CBOR.
pub fn sniff(payload: &[u8]) -> Encoding {
    match payload.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => Encoding::Json,
        _ => Encoding::Cbor,
    }
}

/// The encoding of the answer to a payload that could not be read: that of [`sniff`], but
/// JSON also for any other non-empty UTF-8 text (`[1, 2]`, `hello`): its sender writes text,
/// and a CBOR map is never UTF-8 (its first byte, 0xa0-0xbf, is a continuation byte), so a
/// readable CBOR document never takes this path (docs/PROTOCOL.md §4).
pub fn answer_encoding(payload: &[u8]) -> Encoding {
    match sniff(payload) {
        Encoding::Cbor if payload.is_empty() || std::str::from_utf8(payload).is_err() => {
            Encoding::Cbor
        }
        _ => Encoding::Json,
    }
}

/// Why an incoming payload does not decode ([`parse_tree`]).
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid CBOR: truncated")]
    Truncated,
    #[error("invalid CBOR: syntax error at byte {0}")]
    Syntax(usize),
    #[error("invalid CBOR: {0}")]
    Semantic(String),
    #[error("invalid CBOR: nested too deep")]
    TooDeep,
    #[error("invalid CBOR: trailing bytes after the document")]
    Trailing,
}

/// Decodes an incoming payload (a desired document or a command) to a generic tree.
pub fn parse_tree(payload: &[u8], encoding: Encoding) -> Result<Cbor, ParseError> {
    match encoding {
        Encoding::Json => Ok(serde_json::from_slice::<Cbor>(payload)?),
        Encoding::Cbor => {
            let mut rest = payload;
            let v = ciborium::de::from_reader_with_recursion_limit::<Cbor, _>(&mut rest, 256)
                .map_err(|e| {
                    use ciborium::de::Error as E;
                    match e {
                        E::Io(_) => ParseError::Truncated,
                        E::Syntax(at) => ParseError::Syntax(at),
                        E::Semantic(_, m) => ParseError::Semantic(m),
                        E::RecursionLimitExceeded => ParseError::TooDeep,
                    }
                })?;
            if !rest.is_empty() {
                return Err(ParseError::Trailing);
            }
            Ok(v)
        }
    }
}

pub fn decode(payload: &[u8], limits: Limits) -> Result<Document, DocError> {
    let encoding = sniff(payload);
    let answer = answer_encoding(payload);
    let fail = |version, reason: String| DocError {
        version,
        reason,
        encoding: answer,
    };
    if payload.len() > limits.max_bytes {
        return Err(fail(
            None,
            format!(
                "document of {} bytes is larger than desired.max_document_bytes ({})",
                payload.len(),
                limits.max_bytes
            ),
        ));
    }
    let tree = parse_tree(payload, encoding).map_err(|e| {
        let mut why = e.to_string();
        if answer != encoding {
            why.push_str(" (text is read as JSON only when it starts with '{')");
        }
        fail(None, why)
    })?;
    let Cbor::Map(fields) = tree else {
        return Err(fail(None, "the document is not a map/object".into()));
    };
    let mut version = None;
    let mut ts = None;
    let mut state = None;
    let mut seen = std::collections::HashSet::new();
    for (k, v) in fields {
        let Cbor::Text(k) = k else {
            return Err(fail(None, "a field name is not text".into()));
        };
        if !seen.insert(k.clone()) {
            return Err(fail(
                None,
                format!("field {} appears twice", quote_short(&k)),
            ));
        }
        match k.as_str() {
            "version" => version = Some(as_u64(&v).ok_or("version")),
            "ts" => ts = Some(as_u64(&v).ok_or("ts")),
            "state" => state = Some(v),
            _ => {} // unknown fields are ignored (forward compatibility)
        }
    }
    let version = match version {
        Some(Ok(v)) => v,
        Some(Err(_)) => return Err(fail(None, "version must be an unsigned integer".into())),
        None => return Err(fail(None, "version is missing".into())),
    };
    let ts = match ts {
        None => None,
        Some(Ok(t)) => Some(t),
        Some(Err(_)) => {
            return Err(fail(
                Some(version),
                "ts must be an unsigned integer (Unix ms)".into(),
            ));
        }
    };
    let Some(Cbor::Map(entries)) = state else {
        return Err(fail(Some(version), "state must be a map/object".into()));
    };
    let mut keys = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(entries.len());
    for (k, v) in entries {
        let Cbor::Text(key) = k else {
            return Err(fail(Some(version), "a key of state is not text".into()));
        };
        if !keys.insert(key.clone()) {
            return Err(fail(
                Some(version),
                format!("key {} appears twice in state", quote_short(&key)),
            ));
        }
        let value = crate::model::change::validate_key(&key)
            .map_err(|e| e.to_string())
            .and_then(|()| to_json(v, 0, limits.max_depth).map_err(|e| e.to_string()))
            .and_then(|v| {
                crate::model::change::encode_value(&key, &v)
                    .map(|_| v)
                    .map_err(|e| e.to_string())
            });
        out.push((key, value));
    }
    Ok(Document {
        version,
        ts,
        state: out,
        encoding,
    })
}

fn as_u64(v: &Cbor) -> Option<u64> {
    match v {
        Cbor::Integer(i) => u64::try_from(i128::from(*i)).ok(),
        _ => None,
    }
}

/// Why a value tree does not convert to JSON ([`to_json`]).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValueError {
    #[error("integer {0} is out of the 64-bit range")]
    OutOfRange(i128),
    #[error("{0} is not a finite number")]
    NotFinite(f64),
    #[error("nested deeper than desired.max_depth ({0})")]
    TooDeep(usize),
    #[error("a map key is not text")]
    KeyNotText,
    #[error("key {} appears twice in a map", quote_short(.0))]
    KeyTwice(String),
    #[error("byte strings are not supported")]
    Bytes,
    #[error("CBOR tag {0} is not supported")]
    Tag(u64),
    #[error("unsupported CBOR value")]
    Unsupported,
}

/// Converts a value tree to JSON under the rules in the module doc. `depth` is the nesting
/// of `v` (0 for a top-level value).
pub fn to_json(v: Cbor, depth: usize, max_depth: usize) -> Result<Value, ValueError> {
    Ok(match v {
        Cbor::Null => Value::Null,
        Cbor::Bool(b) => Value::Bool(b),
        Cbor::Text(s) => Value::String(s),
        Cbor::Integer(i) => {
            let i = i128::from(i);
            if let Ok(u) = u64::try_from(i) {
                Value::from(u)
            } else if let Ok(s) = i64::try_from(i) {
                Value::from(s)
            } else {
                return Err(ValueError::OutOfRange(i));
            }
        }
        Cbor::Float(f) => match serde_json::Number::from_f64(f) {
            Some(n) if f.is_finite() => Value::Number(n),
            _ => return Err(ValueError::NotFinite(f)),
        },
        Cbor::Array(items) => {
            if depth >= max_depth {
                return Err(ValueError::TooDeep(max_depth));
            }
            let items: Result<Vec<_>, _> = items
                .into_iter()
                .map(|x| to_json(x, depth + 1, max_depth))
                .collect();
            Value::Array(items?)
        }
        Cbor::Map(entries) => {
            if depth >= max_depth {
                return Err(ValueError::TooDeep(max_depth));
            }
            let mut m = serde_json::Map::new();
            for (k, v) in entries {
                let Cbor::Text(k) = k else {
                    return Err(ValueError::KeyNotText);
                };
                let v = to_json(v, depth + 1, max_depth)?;
                if m.insert(k.clone(), v).is_some() {
                    return Err(ValueError::KeyTwice(k));
                }
            }
            Value::Object(m)
        }
        Cbor::Bytes(_) => return Err(ValueError::Bytes),
        Cbor::Tag(t, _) => return Err(ValueError::Tag(t)),
        _ => return Err(ValueError::Unsupported),
    })
}

/// `s` quoted for a message, cut to 80 characters: names in messages come from the payload,
/// and a long one must not make the answer (desired result, command response) unbounded.
pub fn quote_short(s: &str) -> String {
    const MAX: usize = 80;
    if s.chars().count() <= MAX {
        format!("{s:?}")
    } else {
        let short: String = s.chars().take(MAX).collect();
        format!("{short:?}…")
    }
}

/// Encodes a document to send (results, command responses) in `encoding`.
pub fn encode(v: &Value, encoding: Encoding) -> Vec<u8> {
    match encoding {
        Encoding::Json => serde_json::to_vec(v).unwrap_or_default(),
        Encoding::Cbor => {
            let mut out = Vec::new();
            if ciborium::into_writer(v, &mut out).is_err() {
                out.clear();
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const L: Limits = Limits {
        max_bytes: 256 * 1024,
        max_depth: 4,
    };

    fn cbor(v: &Cbor) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(v, &mut out).unwrap();
        out
    }

    #[test]
    fn json_and_cbor_decode_to_the_same_document() {
        let doc = json!({"version": 7, "ts": 1764150000000u64, "state": {"setpoint": 20, "led.mode": "blink", "old.key": null, "x": {"a": [1.5, true]}}});
        let j = decode(doc.to_string().as_bytes(), L).unwrap();
        let mut c_bytes = Vec::new();
        ciborium::into_writer(&doc, &mut c_bytes).unwrap();
        let c = decode(&c_bytes, L).unwrap();
        assert_eq!(j.encoding, Encoding::Json);
        assert_eq!(c.encoding, Encoding::Cbor);
        assert_eq!((j.version, j.ts), (7, Some(1_764_150_000_000)));
        assert_eq!(j.state, c.state);
        assert_eq!(j.state.len(), 4);
        assert!(j.state.iter().all(|(_, v)| v.is_ok()));
    }

    #[test]
    fn whole_document_errors() {
        for (bad, why) in [
            (&b"not a doc"[..], "invalid CBOR"),
            (b"{nope", "invalid JSON"),
            (b"[1,2]", "invalid CBOR"),
            (br#"{"state": {}}"#, "version is missing"),
            (br#"{"version": -1, "state": {}}"#, "unsigned"),
            (br#"{"version": 1.5, "state": {}}"#, "unsigned"),
            (br#"{"version": 1}"#, "state must be"),
            (br#"{"version": 1, "state": [1]}"#, "state must be"),
            (br#"{"version": 1, "state": {"a": 1, "a": 2}}"#, "twice"),
            (br#"{"version": 1, "version": 2, "state": {}}"#, "twice"),
            (br#"{"version": 1, "ts": "x", "state": {}}"#, "ts must be"),
        ] {
            let e = decode(bad, L).unwrap_err();
            assert!(e.reason.contains(why), "{bad:?}: {e}");
        }
        let big = vec![b' '; L.max_bytes + 1];
        assert!(decode(&big, L).unwrap_err().reason.contains("larger"));
    }

    #[test]
    fn key_level_errors_reject_only_that_key() {
        let doc = json!({"version": 2, "state": {
            "ok": 1,
            "bad key": 1,
            "deep": [[[[[1]]]]],
            "big": "x".repeat(70_000),
        }});
        let d = decode(
            doc.to_string().as_bytes(),
            Limits {
                max_bytes: 1 << 20,
                max_depth: 4,
            },
        )
        .unwrap();
        let get = |k: &str| d.state.iter().find(|(x, _)| x == k).unwrap().1.clone();
        assert_eq!(get("ok"), Ok(json!(1)));
        assert!(get("bad key").unwrap_err().contains("invalid"));
        assert!(get("deep").unwrap_err().contains("max_depth"));
        assert!(get("big").unwrap_err().contains("limit"));
    }

    #[test]
    fn hostile_cbor_is_refused_not_trusted() {
        let doc = |v: Cbor| {
            Cbor::Map(vec![
                (Cbor::Text("version".into()), Cbor::Integer(1.into())),
                (
                    Cbor::Text("state".into()),
                    Cbor::Map(vec![(Cbor::Text("k".into()), v)]),
                ),
            ])
        };
        for (v, why) in [
            (Cbor::Float(f64::NAN), "finite"),
            (Cbor::Float(f64::INFINITY), "finite"),
            (Cbor::Bytes(vec![1, 2]), "byte strings"),
            (Cbor::Tag(0, Box::new(Cbor::Text("2020".into()))), "tag"),
            (
                Cbor::Map(vec![(Cbor::Integer(1.into()), Cbor::Null)]),
                "not text",
            ),
            (
                Cbor::Map(vec![
                    (Cbor::Text("a".into()), Cbor::Null),
                    (Cbor::Text("a".into()), Cbor::Null),
                ]),
                "twice",
            ),
        ] {
            let d = decode(&cbor(&doc(v)), L).unwrap();
            let err = d.state[0].1.clone().unwrap_err();
            assert!(err.contains(why), "{err}");
        }
        // A huge declared length with nothing behind it.
        let mut huge = cbor(&Cbor::Map(vec![(
            Cbor::Text("version".into()),
            Cbor::Integer(1.into()),
        )]));
        huge[0] = 0xa2;
        huge.extend([
            0x65, b's', b't', b'a', b't', b'e', 0x5b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff,
        ]);
        assert!(decode(&huge, L).is_err());
        // Trailing garbage.
        let mut trailing = cbor(&doc(Cbor::Null));
        trailing.push(0x00);
        assert!(
            decode(&trailing, L)
                .unwrap_err()
                .reason
                .contains("trailing")
        );
    }

    #[test]
    fn sniffing_follows_the_first_non_whitespace_byte() {
        assert_eq!(sniff(b"  \n{"), Encoding::Json);
        assert_eq!(sniff(&[0xa2]), Encoding::Cbor);
        assert_eq!(sniff(b""), Encoding::Cbor);
    }

    // Issue 15: garbage that looks like text was answered in CBOR, which its sender (writing
    // text) cannot read.
    #[test]
    fn unreadable_text_is_answered_in_json_and_binary_in_cbor() {
        for (payload, want) in [
            (&b"{nope"[..], Encoding::Json),
            (b" [1, 2]", Encoding::Json),
            (b"hello", Encoding::Json),
            (b"42", Encoding::Json),
            ("café".as_bytes(), Encoding::Json),
            (b"", Encoding::Cbor),
            (b"\xff\x00garbage", Encoding::Cbor),
            (&[0xa1, 0x61, b'x'], Encoding::Cbor),
        ] {
            assert_eq!(answer_encoding(payload), want, "{payload:?}");
            let e = decode(payload, L).unwrap_err();
            assert_eq!(e.encoding, want, "{payload:?}: {e}");
        }
        let e = decode(b"[1, 2]", L).unwrap_err();
        assert!(e.reason.contains("starts with '{'"), "{e}");
        // A readable CBOR document with a bad field is still answered in CBOR.
        let doc = cbor(&Cbor::Map(vec![(
            Cbor::Text("version".into()),
            Cbor::Text("7".into()),
        )]));
        assert_eq!(decode(&doc, L).unwrap_err().encoding, Encoding::Cbor);
    }

    // Regression (fuzzing, issue 7): messages quoted whole names from the payload, so a
    // repeated 20,000-character name of control characters gave a 100 KB result.
    #[test]
    fn messages_quote_at_most_80_characters_of_a_name() {
        let long = "\u{1}".repeat(20_000);
        let t = |s: &str| Cbor::Text(s.to_owned());
        let twice = |k: &str| Cbor::Map(vec![(t(k), Cbor::Null), (t(k), Cbor::Null)]);
        let field = cbor(&Cbor::Map(vec![
            (t("version"), Cbor::Integer(1.into())),
            (t(&long), Cbor::Null),
            (t(&long), Cbor::Null),
        ]));
        let state = cbor(&Cbor::Map(vec![
            (t("version"), Cbor::Integer(1.into())),
            (t("state"), twice(&long)),
        ]));
        let nested = cbor(&Cbor::Map(vec![
            (t("version"), Cbor::Integer(1.into())),
            (t("state"), Cbor::Map(vec![(t("k"), twice(&long))])),
        ]));
        for doc in [field, state] {
            let e = decode(&doc, L).unwrap_err();
            assert!(
                e.reason.contains("twice") && e.reason.len() < 1024,
                "{}",
                e.reason.len()
            );
        }
        let d = decode(&nested, L).unwrap();
        let e = d.state[0].1.as_ref().unwrap_err();
        assert!(e.contains("twice") && e.len() < 1024, "{}", e.len());
        assert_eq!(quote_short("ab"), "\"ab\"");
        assert_eq!(
            quote_short(&"é".repeat(81)),
            format!("{:?}…", "é".repeat(80))
        );
    }
}
