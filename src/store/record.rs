//! The outbox's on-disk record: a CBOR array `[ts, key, value]` (ts: Unix ms, key: text,
//! value: the change's CBOR value, stored verbatim), or `[ts, key, value, origin]` for a
//! change the agent made itself (origin `cloud` or `rollback`). The seq is the table key, not part of
//! the record. Heads are written by hand so the value bytes can later be spliced into a
//! CBOR batch without decoding them. Readers accept arrays of 3 or more items so that later
//! versions may append fields.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("malformed outbox record: {0}")]
pub struct RecordError(&'static str);

/// A decoded record borrowing its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub ts: u64,
    pub key: &'a str,
    /// The value's CBOR encoding.
    pub value: &'a [u8],
    /// `None` for a change reported by the device; else who made it.
    pub origin: Option<&'a str>,
}

const MAJOR_UINT: u8 = 0;
const MAJOR_TEXT: u8 = 3;
const MAJOR_ARRAY: u8 = 4;

/// Appends a CBOR head (major type + argument) to `out`.
pub fn write_head(out: &mut Vec<u8>, major: u8, arg: u64) {
    let m = major << 5;
    if arg < 24 {
        out.push(m | arg as u8);
    } else if let Ok(a) = u8::try_from(arg) {
        out.extend_from_slice(&[m | 24, a]);
    } else if let Ok(a) = u16::try_from(arg) {
        out.push(m | 25);
        out.extend_from_slice(&a.to_be_bytes());
    } else if let Ok(a) = u32::try_from(arg) {
        out.push(m | 26);
        out.extend_from_slice(&a.to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&arg.to_be_bytes());
    }
}

/// Reads a CBOR head; returns (major, argument, rest).
fn read_head(buf: &[u8]) -> Result<(u8, u64, &[u8]), RecordError> {
    let (&first, rest) = buf.split_first().ok_or(RecordError("truncated head"))?;
    let major = first >> 5;
    let info = first & 0x1f;
    let (arg, rest) = match info {
        0..=23 => (u64::from(info), rest),
        24..=27 => {
            let n = 1usize << (info - 24);
            if rest.len() < n {
                return Err(RecordError("truncated head"));
            }
            let (bytes, rest) = rest.split_at(n);
            let arg = bytes.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
            (arg, rest)
        }
        _ => return Err(RecordError("unsupported head")),
    };
    Ok((major, arg, rest))
}

/// Appends a CBOR text string.
pub fn write_text(out: &mut Vec<u8>, s: &str) {
    write_head(out, MAJOR_TEXT, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// Appends a CBOR unsigned integer.
pub fn write_uint(out: &mut Vec<u8>, v: u64) {
    write_head(out, MAJOR_UINT, v);
}

/// Appends a CBOR array head.
pub fn write_array_head(out: &mut Vec<u8>, len: u64) {
    write_head(out, MAJOR_ARRAY, len);
}

/// Encoded length of a record, for bounds accounting before encoding.
pub fn encoded_len(key: &str, value: &[u8]) -> usize {
    1 + 9 + 9 + key.len() + value.len()
}

/// Encodes a record into `out` (cleared first).
pub fn encode_into(out: &mut Vec<u8>, ts: u64, key: &str, value: &[u8]) {
    encode_with_origin(out, ts, key, value, None);
}

/// Encodes a record with an origin other than the device (`Some("cloud")`).
pub fn encode_with_origin(
    out: &mut Vec<u8>,
    ts: u64,
    key: &str,
    value: &[u8],
    origin: Option<&str>,
) {
    out.clear();
    write_array_head(out, if origin.is_some() { 4 } else { 3 });
    write_uint(out, ts);
    write_text(out, key);
    out.extend_from_slice(value);
    if let Some(o) = origin {
        write_text(out, o);
    }
}

/// Encodes a record.
pub fn encode(ts: u64, key: &str, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_len(key, value));
    encode_into(&mut out, ts, key, value);
    out
}

/// Decodes a record without copying. The value's extent is everything after the key when
/// the array has 3 items; with more items it is delimited by decoding it.
pub fn decode(buf: &[u8]) -> Result<RecordRef<'_>, RecordError> {
    let (major, len, rest) = read_head(buf)?;
    if major != MAJOR_ARRAY || len < 3 {
        return Err(RecordError("not an array of 3 or more items"));
    }
    let (major, ts, rest) = read_head(rest)?;
    if major != MAJOR_UINT {
        return Err(RecordError("ts is not an unsigned integer"));
    }
    let (major, klen, rest) = read_head(rest)?;
    if major != MAJOR_TEXT {
        return Err(RecordError("key is not text"));
    }
    let klen = usize::try_from(klen).map_err(|_| RecordError("key too long"))?;
    if rest.len() < klen {
        return Err(RecordError("truncated key"));
    }
    let (key, value) = rest.split_at(klen);
    let key = std::str::from_utf8(key).map_err(|_| RecordError("key is not UTF-8"))?;
    let (value, origin) = if len == 3 {
        (value, None)
    } else {
        let total = value.len();
        let mut cursor = std::io::Cursor::new(value);
        let _: ciborium::Value =
            ciborium::from_reader(&mut cursor).map_err(|_| RecordError("bad value"))?;
        let end = usize::try_from(cursor.position())
            .unwrap_or(total)
            .min(total);
        let (value, rest) = value.split_at(end);
        // The origin, if the 4th item is text; later items are ignored.
        let origin = match read_head(rest) {
            Ok((MAJOR_TEXT, n, tail)) => usize::try_from(n)
                .ok()
                .and_then(|n| tail.get(..n))
                .and_then(|b| std::str::from_utf8(b).ok()),
            _ => None,
        };
        (value, origin)
    };
    if value.is_empty() {
        return Err(RecordError("missing value"));
    }
    Ok(RecordRef {
        ts,
        key,
        value,
        origin,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_and_value_is_verbatim() {
        for ts in [
            0,
            23,
            24,
            255,
            256,
            65_535,
            65_536,
            1_764_150_000_000,
            u64::MAX,
        ] {
            let value = crate::change::encode_value("k", &serde_json::json!({"a": [1, 2.5]}))
                .unwrap_or_default();
            let rec = encode(ts, "led.mode", &value);
            assert!(rec.len() <= encoded_len("led.mode", &value));
            let got = decode(&rec).unwrap();
            assert_eq!(got.ts, ts);
            assert_eq!(got.key, "led.mode");
            assert_eq!(got.value, &value[..]);
        }
    }

    #[test]
    fn record_is_valid_cbor() {
        let rec = encode(5, "k", &[0xf6]);
        let v: ciborium::Value = ciborium::from_reader(&rec[..]).unwrap();
        assert_eq!(
            v,
            ciborium::Value::Array(vec![5.into(), "k".into(), ciborium::Value::Null])
        );
    }

    #[test]
    fn longer_records_from_later_versions_are_read() {
        let mut rec = Vec::new();
        write_array_head(&mut rec, 4);
        write_uint(&mut rec, 7);
        write_text(&mut rec, "k");
        rec.push(0x01); // value 1
        write_text(&mut rec, "cloud");
        let got = decode(&rec).unwrap();
        assert_eq!((got.ts, got.key, got.value), (7, "k", &[0x01u8][..]));
        assert_eq!(got.origin, Some("cloud"));
        let mut out = Vec::new();
        encode_with_origin(&mut out, 9, "k", &[0xf6], Some("rollback"));
        let got = decode(&out).unwrap();
        assert_eq!((got.value, got.origin), (&[0xf6u8][..], Some("rollback")));
        assert_eq!(decode(&encode(1, "k", &[1])).unwrap().origin, None);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            &[][..],
            &[0x83],
            &[0x83, 0x00],
            &[0x83, 0x00, 0x65, b'a'],
            &[0x82, 0x00, 0x61, b'a'],
            &[0x83, 0x61, b'a', 0x61, b'a', 0x00],
            &[0x83, 0x1f],
            &[0x84, 0x00, 0x61, b'a', 0xff],
            &[0x83, 0x00, 0x61, 0xff, 0x00],
            &[0x83, 0x00, 0x61, b'a'],
        ] {
            assert!(decode(bad).is_err(), "{bad:?}");
        }
    }
}
