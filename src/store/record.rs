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

/// Length of a CBOR head with argument `arg`.
fn head_len(arg: u64) -> usize {
    match arg {
        0..24 => 1,
        24..=0xff => 2,
        0x100..=0xffff => 3,
        0x1_0000..=0xffff_ffff => 5,
        _ => 9,
    }
}

/// Exact length of the record [`encode_with_origin`] writes (the `reported` table's
/// accounting, checked before anything is written).
pub fn exact_len(ts: u64, key: &str, value_len: usize, origin: Option<&str>) -> usize {
    1 + head_len(ts)
        + head_len(key.len() as u64)
        + key.len()
        + value_len
        + origin.map_or(0, |o| head_len(o.len() as u64) + o.len())
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

/// Decodes a record without copying. The value is checked to be one well-formed CBOR value
/// of the kinds a change's JSON value encodes to (see [`value_end`]); with 3 items it must
/// end the record.
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
    // The value must be exactly one well-formed value of the kind a change holds: a
    // record damaged on disk is refused here instead of spoiling the batch it is spliced
    // into (the cloud could not decode the batch).
    let end = value_end(value)?;
    let (value, rest) = value.split_at(end);
    let origin = if len == 3 {
        if !rest.is_empty() {
            return Err(RecordError("trailing bytes after the value"));
        }
        None
    } else {
        // The origin, if the 4th item is text; later items are ignored.
        match read_head(rest) {
            Ok((MAJOR_TEXT, n, tail)) => usize::try_from(n)
                .ok()
                .and_then(|n| tail.get(..n))
                .and_then(|b| std::str::from_utf8(b).ok()),
            _ => None,
        }
    };
    Ok(RecordRef {
        ts,
        key,
        value,
        origin,
    })
}

/// Deepest nesting of a stored value (ciborium's own recursion limit when it decodes one).
const MAX_DEPTH: usize = 256;

/// Checks that `buf` starts with one CBOR value as [`crate::model::change::encode_value`] writes
/// it (from JSON: integers, finite floats, UTF-8 text, definite arrays, maps with text keys,
/// `false`/`true`/`null`) and returns its length. No allocation: it runs for every record
/// a drain sends.
pub fn value_end(buf: &[u8]) -> Result<usize, RecordError> {
    let rest = skip_value(buf, 0)?;
    Ok(buf.len() - rest.len())
}

fn skip_value(buf: &[u8], depth: usize) -> Result<&[u8], RecordError> {
    if depth > MAX_DEPTH {
        return Err(RecordError("value nested too deeply"));
    }
    let first = *buf.first().ok_or(RecordError("missing value"))?;
    if first >> 5 == 7 {
        return match first & 0x1f {
            20..=22 => Ok(&buf[1..]),
            25 => float(buf, 2, |b| half_is_finite(u16::from_be_bytes([b[0], b[1]]))),
            26 => float(buf, 4, |b| {
                f32::from_be_bytes([b[0], b[1], b[2], b[3]]).is_finite()
            }),
            27 => float(buf, 8, |b| {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                f64::from_be_bytes(a).is_finite()
            }),
            _ => Err(RecordError("value holds a simple value JSON has not")),
        };
    }
    let (major, arg, rest) = read_head(buf)?;
    match major {
        MAJOR_UINT => Ok(rest),
        1 if arg <= i64::MAX as u64 => Ok(rest),
        1 => Err(RecordError("negative integer out of range")),
        MAJOR_TEXT => {
            let n = usize::try_from(arg).map_err(|_| RecordError("text too long"))?;
            let text = rest.get(..n).ok_or(RecordError("truncated text"))?;
            std::str::from_utf8(text).map_err(|_| RecordError("text is not UTF-8"))?;
            Ok(&rest[n..])
        }
        MAJOR_ARRAY => {
            let mut rest = rest;
            for _ in 0..arg {
                rest = skip_value(rest, depth + 1)?;
            }
            Ok(rest)
        }
        5 => {
            let mut rest = rest;
            for _ in 0..arg {
                if rest.first().is_none_or(|b| b >> 5 != MAJOR_TEXT) {
                    return Err(RecordError("map key is not text"));
                }
                rest = skip_value(rest, depth + 1)?;
                rest = skip_value(rest, depth + 1)?;
            }
            Ok(rest)
        }
        _ => Err(RecordError("value holds a CBOR type JSON has not")),
    }
}

fn float(buf: &[u8], n: usize, finite: impl Fn(&[u8]) -> bool) -> Result<&[u8], RecordError> {
    let bytes = buf.get(1..=n).ok_or(RecordError("truncated float"))?;
    if !finite(bytes) {
        return Err(RecordError("float is not finite"));
    }
    Ok(&buf[1 + n..])
}

/// A half float is finite unless its exponent bits are all ones.
fn half_is_finite(bits: u16) -> bool {
    bits & 0x7c00 != 0x7c00
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
            let value =
                crate::model::change::encode_value("k", &serde_json::json!({"a": [1, 2.5]}))
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

#[cfg(test)]
mod len_tests {
    use super::*;

    #[test]
    fn exact_len_is_what_encoding_writes() {
        let mut out = Vec::new();
        let long = "k".repeat(70_000);
        for ts in [
            0,
            23,
            24,
            255,
            256,
            65_535,
            65_536,
            u64::from(u32::MAX) + 1,
            u64::MAX,
        ] {
            for key in [
                "",
                "a",
                &"k".repeat(23),
                &"k".repeat(24),
                &"k".repeat(300),
                &long,
            ] {
                for value in [&[0xf6u8][..], &[0x19, 1, 2][..]] {
                    for origin in [None, Some("cloud")] {
                        encode_with_origin(&mut out, ts, key, value, origin);
                        assert_eq!(exact_len(ts, key, value.len(), origin), out.len());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod value_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_json_value_passes_and_damage_is_refused() {
        let v = json!({"a": [1, -2, 2.5, 1e300, "text ü", null, true, false, {"b": {}}],
                       "big": u64::MAX, "neg": i64::MIN, "s": "x".repeat(300)});
        let value = crate::model::change::encode_value("k", &v).unwrap();
        assert_eq!(value_end(&value), Ok(value.len()));
        let rec = encode(1, "k", &value);
        assert!(decode(&rec).is_ok());
        // Truncated, trailing bytes, a byte string, a tag, undefined, NaN, invalid UTF-8,
        // a non-text map key, an indefinite length.
        assert!(decode(&rec[..rec.len() - 1]).is_err());
        let mut long = rec.clone();
        long.push(0x01);
        assert!(decode(&long).is_err());
        for bad in [
            &[0x41, 0x00][..],
            &[0xc1, 0x00],
            &[0xf7],
            &[0xf9, 0x7e, 0x00],
            &[0xfb, 0x7f, 0xf8, 0, 0, 0, 0, 0, 0],
            &[0x62, 0xc3, 0x28],
            &[0xa1, 0x01, 0x01],
            &[0x9f, 0xff],
            &[0x3b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        ] {
            assert!(value_end(bad).is_err(), "{bad:?}");
            assert!(decode(&encode(1, "k", bad)).is_err(), "{bad:?}");
        }
        let deep = [vec![0x81; 300], vec![0x01]].concat();
        assert!(value_end(&deep).is_err());
    }
}
