//! The Device Shadow watermarks of the `aws-iot` profile: per shadow, the highest seq up to
//! which every key's latest value was accepted by the shadow (or dropped on a permanent
//! rejection). A key whose latest `reported` seq is above its shadow's watermark is still
//! to be reported, also after a restart.

use std::collections::HashMap;

use redb::ReadableTable;
use serde_json::Value;

use crate::store::tables::SHADOW;
use crate::store::{Outbox, StoreError, record};

/// Every shadow's watermark (a shadow not listed has 0).
pub fn watermarks(outbox: &Outbox) -> Result<HashMap<String, u64>, StoreError> {
    let txn = outbox.read()?;
    let t = match txn.open_table(SHADOW) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(HashMap::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = HashMap::new();
    for item in t.iter()? {
        let (k, v) = item?;
        out.insert(k.value().to_owned(), v.value());
    }
    Ok(out)
}

/// Raises `shadow`'s watermark to `seq` (never lowers it: writes may land out of order)
/// with the writer's next transaction, not waited for: a watermark lost to a full queue or
/// a crash only makes values go to the shadow once more. `false` if it was not queued.
pub fn advance(outbox: &Outbox, shadow: String, seq: u64) -> bool {
    outbox.transact_later(move |ctx| {
        let mut t = ctx.txn.open_table(SHADOW)?;
        let old = t.get(shadow.as_str())?.map_or(0, |v| v.value());
        if seq > old {
            t.insert(shadow.as_str(), seq)?;
        }
        Ok(())
    })
}

/// The latest value of every key reported after `seq`: `(key, seq, value)`.
pub fn latest_after(outbox: &Outbox, seq: u64) -> Result<Vec<(String, u64, Value)>, StoreError> {
    let txn = outbox.read()?;
    let t = txn.open_table(crate::store::tables::REPORTED)?;
    let mut out = Vec::new();
    for item in t.iter()? {
        let (k, v) = item?;
        let (s, rec) = v.value();
        if s <= seq {
            continue;
        }
        let r = record::decode(rec).map_err(|e| StoreError::Io(e.to_string()))?;
        let value = crate::model::change::decode_value(r.value)
            .map_err(|e| StoreError::Io(e.to_string()))?;
        out.push((k.value().to_owned(), s, value));
    }
    Ok(out)
}
