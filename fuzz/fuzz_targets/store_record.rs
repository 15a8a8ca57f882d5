//! The outbox record codec: decoding arbitrary bytes (a damaged store), and encode→decode
//! of arbitrary records.
#![no_main]

use edgesync::codec::record::{self, RecordRef};
use libfuzzer_sys::arbitrary::{self, Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Record<'a> {
    ts: u64,
    key: &'a str,
    value: &'a [u8],
    origin: Option<&'a str>,
}

fuzz_target!(|data: &[u8]| {
    // Any bytes: an error or a record that re-encodes to itself.
    if let Ok(r) = record::decode(data) {
        assert!(!r.value.is_empty());
        let mut out = Vec::new();
        record::encode_with_origin(&mut out, r.ts, r.key, r.value, r.origin);
        assert_eq!(record::decode(&out), Ok(r));
    }

    // Round trip of a record as the store writes it.
    let Ok(rec) = Record::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    if rec.value.is_empty() {
        return;
    }
    // With an origin, the value must be one CBOR item (the reader finds its end by
    // decoding it), as `change::encode_value` makes them.
    let value = match rec.origin {
        None => rec.value.to_vec(),
        Some(_) => {
            let Ok(v) = ciborium::from_reader::<ciborium::Value, _>(rec.value) else {
                return;
            };
            let mut out = Vec::new();
            ciborium::into_writer(&v, &mut out).unwrap();
            out
        }
    };
    let mut out = Vec::new();
    record::encode_with_origin(&mut out, rec.ts, rec.key, &value, rec.origin);
    if rec.origin.is_none() {
        assert_eq!(out, record::encode(rec.ts, rec.key, &value));
        assert!(out.len() <= record::encoded_len(rec.key, &value));
    }
    // The reader accepts only one well-formed value of the kinds a change's JSON value
    // encodes to (a damaged record is refused, not spliced into a batch): round trip those.
    if record::value_end(&value) != Ok(value.len()) {
        assert!(record::decode(&out).is_err());
        return;
    }
    let expected = RecordRef {
        ts: rec.ts,
        key: rec.key,
        value: &value,
        origin: rec.origin,
    };
    assert_eq!(record::decode(&out), Ok(expected));
});
