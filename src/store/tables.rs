//! The store file's layout: every redb table of the one file, each defined here once, and
//! the JSON encoding of the desired-state and command rows. The outbox's records are
//! encoded by [`super::record`].

use redb::TableDefinition;
use serde::{Deserialize, Serialize};

/// seq → encoded record ([`super::record`]), oldest first.
pub const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
/// key → (seq, encoded value): the latest reported value of each key.
pub const REPORTED: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("reported");
/// Shadow name (`""`: classic) → watermark seq, of the `aws-iot` profile ([`super::shadow`]).
pub const SHADOW: TableDefinition<&str, u64> = TableDefinition::new("shadow_reported");
/// `class << 56 | seq` ([`class_key`]) → ts of every queued change, per retention class
/// (issue 19; only with `[[store.class]]`): the oldest of a class, and expiry, without a
/// scan. `u64 → u64` like [`desired::RESERVED`], so redb's code is not compiled again for
/// another key type (binary size).
pub const CLASS_QUEUE: TableDefinition<u64, u64> = TableDefinition::new("class_queue");
/// seq → class of every queued change whose key has a newer queued value (only with
/// `[[store.class]]`).
pub const SUPERSEDED: TableDefinition<u64, u64> = TableDefinition::new("superseded");

/// The [`CLASS_QUEUE`] key of change `seq` of class `class`. Seqs stay below 2^56 (the
/// clock floor, Unix ms × 1000, reaches it in the year 4253).
pub fn class_key(class: u8, seq: u64) -> u64 {
    (u64::from(class) << 56) | (seq & ((1 << 56) - 1))
}

/// The seq of a [`CLASS_QUEUE`] key.
pub fn class_key_seq(key: u64) -> u64 {
    key & ((1 << 56) - 1)
}
/// Counter name → value (`next_seq`, `depth`, `bytes`, …).
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The desired-state tables ([`super::desired`]).
pub mod desired {
    use redb::TableDefinition;

    pub const META: TableDefinition<&str, u64> = TableDefinition::new("desired_meta");
    pub const INBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("desired_inbox");
    pub const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("desired_state");
    pub const HISTORY: TableDefinition<&str, &[u8]> = TableDefinition::new("desired_history");
    pub const RESULTS: TableDefinition<u64, &[u8]> = TableDefinition::new("desired_results");
    pub const RESULT_OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("result_outbox");
    pub const RESERVED: TableDefinition<u64, u64> = TableDefinition::new("desired_reserved");
}

/// The command tables (`crate::control`'s store).
pub mod control {
    use redb::TableDefinition;

    pub const REQUESTS: TableDefinition<&str, &[u8]> = TableDefinition::new("control_requests");
    pub const ORDER: TableDefinition<u64, &str> = TableDefinition::new("control_order");
    pub const PENDING: TableDefinition<u64, &str> = TableDefinition::new("control_pending");
    pub const META: TableDefinition<&str, u64> = TableDefinition::new("control_meta");
}

/// Decodes a JSON row; a row that does not decode is a corrupt store (`what`: the kind of
/// row, e.g. "desired", named in the error).
pub fn get_json<T: for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> Result<T, redb::Error> {
    serde_json::from_slice(bytes).map_err(|e| redb::Error::Corrupted(format!("{what} record: {e}")))
}

/// Encodes a JSON row.
pub fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}
