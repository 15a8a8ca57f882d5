//! The Device Shadow watermarks of the `aws-iot` profile: per shadow, the highest seq up to
//! which every key's latest value was accepted by the shadow (or dropped on a permanent
//! rejection). A key whose latest `reported` seq is above its shadow's watermark is still
//! to be reported, also after a restart.

use redb::ReadableTable;

use crate::store::tables::SHADOW;
use crate::store::{Outbox, StoreError};

/// A shadow's watermark (0 for a new shadow, or when it cannot be read: its values then go
/// to the shadow again).
pub fn watermark(outbox: &Outbox, shadow: &str) -> u64 {
    let read = || -> Result<u64, StoreError> {
        let txn = outbox.read()?;
        Ok(match txn.open_table(SHADOW) {
            Ok(t) => t.get(shadow)?.map_or(0, |v| v.value()),
            Err(_) => 0,
        })
    };
    read().unwrap_or(0)
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
