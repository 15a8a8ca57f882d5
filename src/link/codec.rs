//! Encoding of the documents the agent publishes (docs/PROTOCOL.md §5), starting with the change batch
//! `{"device": D, "changes": [{"seq", "key", "value", "ts"}, ...]}` in CBOR or JSON.
//!
//! CBOR batches splice each record's stored value bytes in verbatim (no decode), so a drain
//! costs little more than copying. Sizes are exact: a [`BatchBuilder`] never produces a
//! payload over its byte limit, except for a single change, which config validation makes
//! sure always fits.
//!
//! With `sync.compression` the finished document is compressed ([`Compression::apply`]):
//! the byte limit bounds the document before compression, and a compressed payload is sent
//! only when smaller, so the limit holds on the wire too (and with it the cloud's message
//! limits, which config validation checks against `sync.batch_max_bytes`).

use thiserror::Error;

use crate::config::Encoding;
use crate::model::compress::Compression;
use crate::store::Queued;
use crate::store::record::{self, write_text, write_uint};

#[derive(Debug, Error)]
pub enum CodecError {
    #[error("queued change {seq} is unreadable: {reason}")]
    BadRecord { seq: u64, reason: String },
}

/// A finished batch, ready to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub payload: Vec<u8>,
    pub first_seq: u64,
    pub last_seq: u64,
    /// Changes in the payload.
    pub changes: u64,
}

/// Most bytes a CBOR array head takes for any batch length we build.
const MAX_ARRAY_HEAD: usize = 5;

/// Packs queued changes into one batch document.
#[derive(Debug)]
pub struct BatchBuilder {
    encoding: Encoding,
    compression: Compression,
    device: String,
    max_changes: usize,
    max_bytes: usize,
    envelope: usize,
    body: Vec<u8>,
    entry: Vec<u8>,
    changes: usize,
    first_seq: Option<u64>,
    last_seq: u64,
}

impl BatchBuilder {
    pub fn new(encoding: Encoding, device: &str, max_changes: usize, max_bytes: usize) -> Self {
        let mut b = Self {
            encoding,
            compression: Compression::None,
            device: device.to_owned(),
            max_changes: max_changes.max(1),
            max_bytes,
            envelope: 0,
            body: Vec::new(),
            entry: Vec::new(),
            changes: 0,
            first_seq: None,
            last_seq: 0,
        };
        let mut probe = Vec::new();
        b.write_envelope(&mut probe, 0);
        b.envelope = probe.len() + 2 + MAX_ARRAY_HEAD;
        b
    }

    /// Compresses the batches it finishes.
    pub fn with_compression(mut self, compression: Compression) -> Self {
        self.compression = compression;
        self
    }

    pub fn is_empty(&self) -> bool {
        self.first_seq.is_none()
    }

    /// True when no further change can be added.
    pub fn is_full(&self) -> bool {
        self.changes >= self.max_changes
    }

    /// Adds a change if it fits. Returns `Ok(false)` (and adds nothing) when it would exceed
    /// the limits of a non-empty batch. An unreadable record is an error; the caller skips it.
    pub fn push(&mut self, q: &Queued) -> Result<bool, CodecError> {
        if self.is_full() {
            return Ok(false);
        }
        let rec = q.decode().map_err(|e| CodecError::BadRecord {
            seq: q.seq,
            reason: e.to_string(),
        })?;
        self.entry.clear();
        match self.encoding {
            Encoding::Cbor => {
                // map {"seq": u, "key": text, "value": <verbatim>, "ts": u[, "origin": text]}
                self.entry
                    .push(if rec.origin.is_some() { 0xa5 } else { 0xa4 });
                write_text(&mut self.entry, "seq");
                write_uint(&mut self.entry, q.seq);
                write_text(&mut self.entry, "key");
                write_text(&mut self.entry, rec.key);
                write_text(&mut self.entry, "value");
                self.entry.extend_from_slice(rec.value);
                write_text(&mut self.entry, "ts");
                write_uint(&mut self.entry, rec.ts);
                if let Some(origin) = rec.origin {
                    write_text(&mut self.entry, "origin");
                    write_text(&mut self.entry, origin);
                }
            }
            Encoding::Json => {
                let value = crate::model::change::decode_value(rec.value).map_err(|e| {
                    CodecError::BadRecord {
                        seq: q.seq,
                        reason: e.to_string(),
                    }
                })?;
                if !self.body.is_empty() {
                    self.entry.push(b',');
                }
                self.entry.extend_from_slice(b"{\"seq\":");
                self.entry.extend_from_slice(q.seq.to_string().as_bytes());
                self.entry.extend_from_slice(b",\"key\":");
                json_into(&mut self.entry, &rec.key);
                self.entry.extend_from_slice(b",\"value\":");
                json_into(&mut self.entry, &value);
                self.entry.extend_from_slice(b",\"ts\":");
                self.entry.extend_from_slice(rec.ts.to_string().as_bytes());
                if let Some(origin) = rec.origin {
                    self.entry.extend_from_slice(b",\"origin\":");
                    json_into(&mut self.entry, origin);
                }
                self.entry.push(b'}');
            }
        }
        let total = self.envelope + self.body.len() + self.entry.len();
        if !self.is_empty() && total > self.max_bytes {
            return Ok(false);
        }
        self.body.extend_from_slice(&self.entry);
        self.changes += 1;
        self.first_seq.get_or_insert(q.seq);
        self.last_seq = q.seq;
        Ok(true)
    }

    /// Takes the batch out, leaving the builder empty for reuse. `None` if empty.
    pub fn finish(&mut self) -> Option<Batch> {
        let first_seq = self.first_seq.take()?;
        let mut payload = Vec::with_capacity(self.envelope + self.body.len());
        self.write_envelope(&mut payload, self.changes);
        payload.extend_from_slice(&self.body);
        if self.encoding == Encoding::Json {
            payload.extend_from_slice(b"]}");
        }
        let batch = Batch {
            payload: self.compression.apply(payload),
            first_seq,
            last_seq: self.last_seq,
            changes: self.changes as u64,
        };
        self.body.clear();
        self.changes = 0;
        Some(batch)
    }

    fn write_envelope(&self, out: &mut Vec<u8>, changes: usize) {
        match self.encoding {
            Encoding::Cbor => {
                out.push(0xa2);
                write_text(out, "device");
                write_text(out, &self.device);
                write_text(out, "changes");
                record::write_head(out, 4, changes as u64);
            }
            Encoding::Json => {
                out.extend_from_slice(b"{\"device\":");
                json_into(out, &self.device);
                out.extend_from_slice(b",\"changes\":[");
            }
        }
    }
}

fn json_into<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
    // Writing JSON into a Vec cannot fail for these types (strings and JSON values).
    if serde_json::to_writer(&mut *out, v).is_err() {
        out.extend_from_slice(b"null");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::change::encode_value;
    use crate::model::compress::{gunzip, is_compressed};
    use serde_json::{Value, json};

    fn queued(seq: u64, key: &str, value: Value, ts: u64) -> Queued {
        let v = encode_value(key, &value).unwrap();
        Queued {
            seq,
            record: record::encode(ts, key, &v),
        }
    }

    fn decode(enc: Encoding, payload: &[u8]) -> Value {
        match enc {
            Encoding::Json => serde_json::from_slice(payload).unwrap(),
            Encoding::Cbor => ciborium::from_reader(payload).unwrap(),
        }
    }

    #[test]
    fn batch_is_the_spec_document_in_both_encodings() {
        for enc in [Encoding::Cbor, Encoding::Json] {
            let mut b = BatchBuilder::new(enc, "pump-1", 10, 1 << 20);
            assert!(b.push(&queued(41, "temp", json!(21.5), 1000)).unwrap());
            assert!(
                b.push(&queued(43, "led.mode", json!({"a": [1, null]}), 1001))
                    .unwrap()
            );
            let batch = b.finish().unwrap();
            assert_eq!(
                (batch.first_seq, batch.last_seq, batch.changes),
                (41, 43, 2)
            );
            assert_eq!(
                decode(enc, &batch.payload),
                json!({"device": "pump-1", "changes": [
                    {"seq": 41, "key": "temp", "value": 21.5, "ts": 1000},
                    {"seq": 43, "key": "led.mode", "value": {"a": [1, null]}, "ts": 1001},
                ]}),
                "{enc:?}"
            );
            assert!(b.finish().is_none(), "builder is empty after finish");
        }
    }

    #[test]
    fn batches_never_exceed_the_byte_limit() {
        for enc in [Encoding::Cbor, Encoding::Json] {
            for limit in [200, 500, 1000, 4096] {
                let mut b = BatchBuilder::new(enc, "d", 1000, limit);
                let mut seq = 1;
                let mut batches = Vec::new();
                while seq < 200 {
                    let q = queued(seq, "k", json!("x".repeat((seq % 37) as usize)), 5);
                    if b.push(&q).unwrap() {
                        seq += 1;
                    } else {
                        batches.push(b.finish().unwrap());
                    }
                }
                batches.extend(b.finish());
                let mut expect = 1;
                for batch in &batches {
                    assert!(batch.payload.len() <= limit, "{enc:?} {limit}");
                    assert_eq!(batch.first_seq, expect);
                    let v = decode(enc, &batch.payload);
                    assert_eq!(v["changes"].as_array().unwrap().len() as u64, batch.changes);
                    expect = batch.last_seq + 1;
                }
                assert_eq!(expect, 200);
            }
        }
    }

    #[test]
    fn change_count_limit_holds_and_a_lone_large_change_is_accepted() {
        let mut b = BatchBuilder::new(Encoding::Cbor, "d", 2, 1 << 20);
        assert!(b.push(&queued(1, "a", json!(1), 0)).unwrap());
        assert!(b.push(&queued(2, "a", json!(1), 0)).unwrap());
        assert!(b.is_full());
        assert!(!b.push(&queued(3, "a", json!(1), 0)).unwrap());
        b.finish();
        let mut small = BatchBuilder::new(Encoding::Json, "d", 10, 10);
        assert!(small.push(&queued(9, "a", json!("long value"), 0)).unwrap());
    }

    #[test]
    fn changes_made_by_the_agent_carry_their_origin() {
        for enc in [Encoding::Cbor, Encoding::Json] {
            let mut b = BatchBuilder::new(enc, "d", 10, 1 << 20);
            let mut rec = Vec::new();
            record::encode_with_origin(&mut rec, 5, "k", &[0x01], Some("cloud"));
            b.push(&Queued {
                seq: 1,
                record: rec,
            })
            .unwrap();
            b.push(&queued(2, "j", json!(2), 6)).unwrap();
            let v = decode(enc, &b.finish().unwrap().payload);
            assert_eq!(
                v["changes"],
                json!([
                    {"seq": 1, "key": "k", "value": 1, "ts": 5, "origin": "cloud"},
                    {"seq": 2, "key": "j", "value": 2, "ts": 6},
                ])
            );
        }
    }

    /// A numeric sensor batch: `n` changes over 100 keys, floats and integers.
    fn sensor_changes(n: u64) -> Vec<Queued> {
        (0..n)
            .map(|i| {
                let k = (i * 37) % 100;
                let value = if k % 5 >= 3 {
                    json!(1000 + i * 7)
                } else {
                    json!(20.0 + (i % 13) as f64 / 4.0)
                };
                queued(
                    100 + i,
                    &format!("line{}.pump{}.m{}", k / 50, k / 5, k % 5),
                    value,
                    1_764_150_000_000 + i * 97,
                )
            })
            .collect()
    }

    fn build(enc: Encoding, c: Compression, max_bytes: usize, changes: &[Queued]) -> Vec<Batch> {
        let mut b = BatchBuilder::new(enc, "pump-1", 1000, max_bytes).with_compression(c);
        let mut out = Vec::new();
        let mut i = 0;
        while i < changes.len() {
            if b.push(&changes[i]).unwrap() {
                i += 1;
            } else {
                out.push(b.finish().unwrap());
            }
        }
        out.extend(b.finish());
        out
    }

    #[test]
    fn compressed_batches_decompress_to_the_same_document() {
        let changes = sensor_changes(1000);
        for enc in [Encoding::Cbor, Encoding::Json] {
            let plain = build(enc, Compression::None, 1 << 20, &changes);
            let zipped = build(enc, Compression::Gzip, 1 << 20, &changes);
            assert_eq!(plain.len(), 1);
            assert_eq!(zipped.len(), 1);
            let (p, z) = (&plain[0], &zipped[0]);
            assert_eq!(
                (z.first_seq, z.last_seq, z.changes),
                (p.first_seq, p.last_seq, p.changes)
            );
            assert_eq!(gunzip(&z.payload).unwrap(), p.payload, "{enc:?}");
            // The target: at most 40 % of the uncompressed bytes.
            assert!(
                z.payload.len() * 100 <= p.payload.len() * 40,
                "{enc:?}: {} of {}",
                z.payload.len(),
                p.payload.len()
            );
        }
    }

    #[test]
    fn first_bytes_tell_compressed_json_and_cbor_apart() {
        let changes = sensor_changes(50);
        for enc in [Encoding::Cbor, Encoding::Json] {
            for c in [Compression::None, Compression::Gzip] {
                for batch in build(enc, c, 1 << 20, &changes) {
                    let first = batch.payload[0];
                    match (c, enc) {
                        (Compression::Gzip, _) => assert!(is_compressed(&batch.payload)),
                        (Compression::None, Encoding::Json) => assert_eq!(first, b'{'),
                        (Compression::None, Encoding::Cbor) => {
                            assert!((0xa0..=0xbf).contains(&first))
                        }
                    }
                    assert_eq!(
                        is_compressed(&batch.payload),
                        c == Compression::Gzip,
                        "{enc:?} {c:?}"
                    );
                }
            }
        }
        // A batch that does not shrink is sent as it is: still told apart by its first byte.
        let one = build(Encoding::Json, Compression::Gzip, 1 << 20, &changes[..1]);
        assert_eq!(one[0].payload[0], b'{');
    }

    #[test]
    fn compressed_batches_keep_the_byte_limit_and_the_order() {
        let changes = sensor_changes(3000);
        for enc in [Encoding::Cbor, Encoding::Json] {
            for limit in [2000, 66_560] {
                let mut expect = 100;
                for batch in build(enc, Compression::Gzip, limit, &changes) {
                    assert!(batch.payload.len() <= limit);
                    assert_eq!(batch.first_seq, expect);
                    let doc = decode(enc, &gunzip(&batch.payload).unwrap());
                    let seqs: Vec<u64> = doc["changes"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|c| c["seq"].as_u64().unwrap())
                        .collect();
                    assert_eq!(seqs, (batch.first_seq..=batch.last_seq).collect::<Vec<_>>());
                    expect = batch.last_seq + 1;
                }
                assert_eq!(expect, 3100);
            }
        }
    }

    #[test]
    fn unreadable_record_is_an_error() {
        let mut b = BatchBuilder::new(Encoding::Cbor, "d", 10, 1000);
        let bad = Queued {
            seq: 3,
            record: vec![0x01],
        };
        assert!(matches!(
            b.push(&bad),
            Err(CodecError::BadRecord { seq: 3, .. })
        ));
        assert!(b.is_empty());
    }
}
