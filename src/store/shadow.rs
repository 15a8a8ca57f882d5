//! The Device Shadow watermarks of the `aws-iot` profile: per shadow, the highest seq up to
//! which every key's latest value was accepted by the shadow (or dropped on a permanent
//! rejection). A key whose latest `reported` seq is above its shadow's watermark is still
//! to be reported, also after a restart.

use crate::store::tables::SHADOW;
use crate::store::{Op, Outbox, StoreError};

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
/// with the writer's next commit, not waited for and never a commit of its own: a
/// watermark lost to a full queue or a crash only makes values go to the shadow once more.
/// `false` if it was not queued.
pub fn advance(outbox: &Outbox, shadow: String, seq: u64) -> bool {
    outbox.tx.try_send(Op::ShadowMark { shadow, seq }).is_ok()
}
