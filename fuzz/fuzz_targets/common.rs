//! Checks shared by the desired-document targets.

use edgesync::Encoding;
use edgesync::codec::doc::{self, Limits};
use serde_json::{Map, Value};

/// The defaults of `[desired]` (max_document_bytes 64 KiB, max_depth 16).
pub const LIMITS: Limits = Limits {
    max_bytes: 64 * 1024,
    max_depth: 16,
};

/// Levels of containers in `v` (0 for a scalar).
pub fn nesting(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(nesting).max().unwrap_or(0),
        Value::Object(m) => 1 + m.values().map(nesting).max().unwrap_or(0),
        _ => 0,
    }
}

/// Decodes `data`; when accepted, checks what the decoder promises and that the accepted
/// part, re-encoded as CBOR (exact for floats), decodes to the same values.
pub fn check_decode(data: &[u8]) {
    let Ok(d) = doc::decode(data, LIMITS) else {
        return;
    };
    assert_eq!(d.encoding, doc::sniff(data));
    let mut accepted: Vec<(String, Value)> = Vec::new();
    for (k, v) in &d.state {
        if let Ok(v) = v {
            assert!(
                nesting(v) <= LIMITS.max_depth,
                "accepted value too deep: {k}"
            );
            edgesync::validate_key(k).expect("an accepted key is valid");
            accepted.push((k.clone(), v.clone()));
        }
    }
    let mut top = Map::new();
    top.insert("version".into(), d.version.into());
    if let Some(ts) = d.ts {
        top.insert("ts".into(), ts.into());
    }
    top.insert(
        "state".into(),
        Value::Object(accepted.iter().cloned().collect()),
    );
    let bytes = doc::encode(&Value::Object(top), Encoding::Cbor);
    let no_size_limit = Limits {
        max_bytes: usize::MAX,
        ..LIMITS
    };
    let again = doc::decode(&bytes, no_size_limit).expect("the accepted part decodes again");
    assert_eq!((again.version, again.ts), (d.version, d.ts));
    let mut again: Vec<(String, Value)> = again
        .state
        .into_iter()
        .map(|(k, v)| (k, v.expect("an accepted value is accepted again")))
        .collect();
    accepted.sort_by(|a, b| a.0.cmp(&b.0));
    again.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(accepted, again);
}
