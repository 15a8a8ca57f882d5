//! Desired state in the store file, beside the outbox. Every write goes through
//! [`Outbox::transact`], so it commits (and fsyncs) together with the reported changes it
//! queues.
//!
//! # Tables
//! - `desired_meta`: `accepted` (highest version taken in), `applied` (last version applied),
//!   `result_seq` (next result number);
//! - `desired_inbox`: `version → entry` (JSON): documents taken in and not yet finished, with
//!   `applying` set once their handlers may have started;
//! - `desired_state`: `key → {value, version, ts}` (JSON), the desired state as applied;
//! - `desired_history`: `key → [{version, value, ts, origin}]` (JSON), newest last, bounded;
//! - `desired_results`: `version → result` (JSON), results of recent applied versions (to
//!   answer a duplicate);
//! - `result_outbox`: `n → {topic suffix, payload}`: results not yet PUBACKed;
//! - `desired_reserved`: `version → bytes`: what an inbox document reserved of the store.
//!
//! # Bound
//! The state, history and inbox rows count in the store's `state_bytes` (see "Bounds" in
//! [`crate::store`]). Taking a document in reserves its worst-case growth (each key's new
//! state row, one more history entry, its reported row, and the inbox row itself); a key
//! that does not fit in what is left is refused there and then: the applier reports it
//! `rejected` with a `store-full` error, nothing of it is stored. Finishing releases the
//! reservation and charges what was written, never more. History is trimmed, oldest first,
//! while the state is over its allowance (e.g. after a rollback), down to the newest entry.
//!
//! # Invariants
//! - A document is in the inbox (durable) before its PUBACK; versions only move forward.
//! - Finishing a document (new state, history, applied version, its result, and the reported
//!   changes of applied keys) is one transaction.
//! - A document found with `applying` set after a restart is finished with every key
//!   `failed`: a handler that may have run is never run twice.

use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::Encoding;
use crate::model::change::{NewChange, Origin, now_ms};
use crate::store::{Outbox, StoreError, row_cost};

use crate::store::tables::desired::{
    HISTORY, INBOX, META, RESERVED, RESULT_OUTBOX, RESULTS, STATE,
};
use crate::store::tables::{get_json, to_json};

/// Accounted bytes beyond a value's JSON for a state row or history entry whose version and
/// ts are not known yet (20 digits each, field names) and an inbox row's header.
const ENTRY_SLACK: u64 = 96;

/// Results of applied versions kept to answer duplicates.
const KEEP_RESULTS: u64 = 32;

/// A document waiting in the inbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InboxEntry {
    pub version: u64,
    pub ts: Option<u64>,
    /// Each key with its value, or why it is refused.
    pub state: Vec<(String, Result<Value, String>)>,
    pub json: bool,
    pub received: u64,
    pub applying: bool,
}

impl InboxEntry {
    pub fn encoding(&self) -> Encoding {
        if self.json {
            Encoding::Json
        } else {
            Encoding::Cbor
        }
    }
}

/// A key of the desired state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateEntry {
    pub value: Value,
    pub version: u64,
    pub ts: u64,
}

/// One value a key had.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub version: u64,
    pub value: Value,
    pub ts: u64,
    pub origin: Origin,
}

/// A result waiting to be published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingResult {
    pub n: u64,
    /// Topic under `P/D/`, e.g. `desired/result`.
    pub topic: String,
    pub payload: Vec<u8>,
}

/// What happened to an incoming document.
#[derive(Debug, Clone, PartialEq)]
pub enum Received {
    Accepted,
    /// Below the highest accepted version: not applied; a `stale` result was queued.
    Stale {
        current: u64,
    },
    /// The version already taken in: nothing re-applied; its result was queued again if it
    /// is known (else it follows when the document finishes).
    Duplicate,
}

/// A key's change from finishing a document or a rollback.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyUpdate {
    pub key: String,
    /// `Null` removes the key from the desired state.
    pub value: Value,
    pub origin: Origin,
}

fn meta_get(
    t: &impl ReadableTable<&'static str, u64>,
    k: &str,
) -> Result<Option<u64>, redb::Error> {
    Ok(t.get(k)?.map(|v| v.value()))
}

/// Takes in a document: durable before the caller sends the PUBACK.
pub async fn receive(
    outbox: &Outbox,
    entry: InboxEntry,
    stale_result: Vec<u8>,
) -> Result<Received, StoreError> {
    let encoding = entry.encoding();
    outbox
        .transact(move |ctx| {
            let mut meta = ctx.txn.open_table(META)?;
            let accepted = meta_get(&meta, "accepted")?;
            let version = entry.version;
            match accepted {
                Some(a) if version < a => {
                    drop(meta);
                    queue_result(ctx.txn, "desired/result", &stale_result)?;
                    return Ok(Received::Stale { current: a });
                }
                Some(a) if version == a => {
                    let results = ctx.txn.open_table(RESULTS)?;
                    let stored = results.get(version)?.map(|v| v.value().to_vec());
                    drop(results);
                    drop(meta);
                    // The stored result again, marked as the answer to a duplicate.
                    if let Some(bytes) = stored {
                        let mut result: Value = get_json("desired", &bytes)?;
                        result["status"] = Value::from("duplicate");
                        let payload = crate::model::doc::encode(&result, encoding);
                        queue_result(ctx.txn, "desired/result", &payload)?;
                    }
                    return Ok(Received::Duplicate);
                }
                _ => {}
            }
            meta.insert("accepted", version)?;
            drop(meta);
            let mut entry = entry;
            let (growth, values) = reserve(ctx, &mut entry)?;
            // The inbox row as written stands in for the values `reserve` counted in it.
            let row = to_json(&entry);
            let reserved = growth.saturating_sub(values) + row_cost(8, row.len());
            ctx.charge_state(0, reserved)?;
            ctx.txn.open_table(INBOX)?.insert(version, row.as_slice())?;
            ctx.txn.open_table(RESERVED)?.insert(version, reserved)?;
            Ok(Received::Accepted)
        })
        .await
}

/// Worst-case growth of the state tables if `entry` is applied; the keys that do not fit in
/// what the store has left are refused in `entry` (their values dropped). A key that does
/// not fit first has its history trimmed to its newest entry (history is a bounded log).
/// Returns the growth and the part of it that is the values in the inbox row.
fn reserve(
    ctx: &mut crate::store::TxnCtx<'_, '_>,
    entry: &mut InboxEntry,
) -> Result<(u64, u64), redb::Error> {
    let txn = ctx.txn;
    let state = txn.open_table(STATE)?;
    let mut history = txn.open_table(HISTORY)?;
    let mut used = 0u64;
    let mut values = 0u64;
    for (key, v) in &mut entry.state {
        let Ok(value) = v else { continue };
        let old_state = state
            .get(key.as_str())?
            .map_or(0, |r| row_cost(key.len(), r.value().len()));
        let mut growth = key_growth(ctx, &history, key, value, old_state)?;
        if used + growth > ctx.state_room() {
            trim_history(ctx, &mut history, key, u64::MAX / 2)?;
            growth = key_growth(ctx, &history, key, value, old_state)?;
        }
        let room = ctx.state_room();
        if used + growth > room {
            let left = room.saturating_sub(used);
            tracing::warn!(
                version = entry.version,
                key = %key,
                growth,
                left,
                "desired key refused: the store is full"
            );
            *v = Err(format!(
                "store-full: applying this key takes up to {growth} bytes of the store and \
                 {left} are left for latest values and desired state (half of \
                 store.max_bytes, beside the queue)"
            ));
            continue;
        }
        used += growth;
        values += inbox_part(key, value);
    }
    Ok((used, values))
}

/// What a key's value adds to the inbox row.
fn inbox_part(key: &str, value: &Value) -> u64 {
    row_cost(key.len(), to_json(value).len())
}

/// The most applying `value` to `key` can add to the state: its state row, the new history
/// entry (older ones can be trimmed), its reported row, and the value in the inbox row.
fn key_growth(
    ctx: &crate::store::TxnCtx<'_, '_>,
    history: &redb::Table<&str, &[u8]>,
    key: &str,
    value: &Value,
    old_state: u64,
) -> Result<u64, redb::Error> {
    let json = to_json(value).len();
    let new_state = if value.is_null() {
        0
    } else {
        row_cost(key.len(), json) + ENTRY_SLACK
    };
    let old_history = history
        .get(key)?
        .map_or(0, |r| row_cost(key.len(), r.value().len()));
    let new_history = (row_cost(key.len(), json) + ENTRY_SLACK).saturating_sub(old_history);
    let cbor = crate::model::change::encode_value(key, value).map_or(0, |b| b.len());
    let new_reported = row_cost(
        key.len(),
        crate::store::record::encoded_len(key, &[]) + cbor,
    ) + ENTRY_SLACK;
    let old_reported = ctx.reported_cost(key)?;
    let inbox = inbox_part(key, value);
    Ok(new_state.saturating_sub(old_state)
        + new_history
        + new_reported.saturating_sub(old_reported)
        + inbox)
}

/// Accounted bytes of the desired tables (for a store that did not count them yet).
pub fn state_cost(txn: &redb::WriteTransaction) -> Result<u64, redb::Error> {
    let mut total = 0;
    for def in [STATE, HISTORY] {
        for item in txn.open_table(def)?.iter()? {
            let (k, v) = item?;
            total += crate::store::row_cost(k.value().len(), v.value().len());
        }
    }
    let reserved = txn.open_table(RESERVED)?;
    for item in txn.open_table(INBOX)?.iter()? {
        let (k, v) = item?;
        total += match reserved.get(k.value())? {
            Some(r) => r.value(),
            None => crate::store::row_cost(8, v.value().len()),
        };
    }
    Ok(total)
}

/// Queues a result inside the caller's transaction (also command responses).
pub fn queue_result(
    txn: &redb::WriteTransaction,
    topic: &str,
    payload: &[u8],
) -> Result<u64, redb::Error> {
    let mut meta = txn.open_table(META)?;
    let n = meta_get(&meta, "result_seq")?.unwrap_or(1);
    meta.insert("result_seq", n + 1)?;
    let item = PendingResult {
        n,
        topic: topic.to_owned(),
        payload: payload.to_vec(),
    };
    txn.open_table(RESULT_OUTBOX)?
        .insert(n, to_json(&item).as_slice())?;
    Ok(n)
}

/// Queues a result (e.g. for a document that could not be read at all).
pub async fn queue(outbox: &Outbox, topic: &str, payload: Vec<u8>) -> Result<u64, StoreError> {
    let topic = topic.to_owned();
    outbox
        .transact(move |ctx| queue_result(ctx.txn, &topic, &payload))
        .await
}

/// Marks a document as applying: from now on a crash means its keys are reported failed.
pub async fn begin(outbox: &Outbox, version: u64) -> Result<(), StoreError> {
    outbox
        .transact(move |ctx| {
            let mut inbox = ctx.txn.open_table(INBOX)?;
            let entry = inbox.get(version)?.map(|v| v.value().to_vec());
            if let Some(bytes) = entry {
                let mut e: InboxEntry = get_json("desired", &bytes)?;
                e.applying = true;
                inbox.insert(version, to_json(&e).as_slice())?;
            }
            Ok(())
        })
        .await
}

/// Finishes a document in one transaction: state, history, applied version, its result
/// (stored and queued), and reported changes (origin cloud) for every updated key.
pub async fn finish(
    outbox: &Outbox,
    version: u64,
    updates: Vec<KeyUpdate>,
    result: Value,
    encoding: Encoding,
    history_len: usize,
) -> Result<(), StoreError> {
    outbox
        .transact(move |ctx| {
            // What taking the document in reserved (an inbox row of an older store: its row).
            let row = ctx
                .txn
                .open_table(INBOX)?
                .remove(version)?
                .map_or(0, |v| crate::store::row_cost(8, v.value().len()));
            let reserved = ctx
                .txn
                .open_table(RESERVED)?
                .remove(version)?
                .map_or(row, |v| v.value());
            ctx.charge_state(reserved, 0)?;
            apply_updates(ctx, version, &updates, history_len)?;
            let mut meta = ctx.txn.open_table(META)?;
            let applied = meta_get(&meta, "applied")?.unwrap_or(0);
            meta.insert("applied", applied.max(version))?;
            drop(meta);
            let mut results = ctx.txn.open_table(RESULTS)?;
            results.insert(version, to_json(&result).as_slice())?;
            // Keep only recent results.
            if version > KEEP_RESULTS {
                for item in results.extract_from_if(..version - KEEP_RESULTS, |_, _| true)? {
                    item?;
                }
            }
            drop(results);
            let payload = crate::model::doc::encode(&result, encoding);
            queue_result(ctx.txn, "desired/result", &payload)?;
            Ok(())
        })
        .await
}

/// Records updates of keys (also used by rollback): desired state, history, reported
/// changes.
pub fn apply_updates(
    ctx: &mut crate::store::TxnCtx<'_, '_>,
    version: u64,
    updates: &[KeyUpdate],
    history_len: usize,
) -> Result<(), redb::Error> {
    if updates.is_empty() {
        return Ok(());
    }
    let now = now_ms();
    let mut changes = Vec::with_capacity(updates.len());
    {
        let mut state = ctx.txn.open_table(STATE)?;
        let mut history = ctx.txn.open_table(HISTORY)?;
        let cost = |key: &str, len: usize| crate::store::row_cost(key.len(), len);
        for u in updates {
            let key = u.key.as_str();
            let old = if u.value.is_null() {
                state.remove(key)?
            } else {
                let e = StateEntry {
                    value: u.value.clone(),
                    version,
                    ts: now,
                };
                let row = to_json(&e);
                ctx.charge_state(0, cost(key, row.len()))?;
                state.insert(key, row.as_slice())?
            };
            if let Some(old) = old {
                ctx.charge_state(cost(key, old.value().len()), 0)?;
            }
            if history_len > 0 {
                let old = history.get(key)?.map(|v| v.value().to_vec());
                let old_cost = old.as_ref().map_or(0, |b| cost(key, b.len()));
                let mut list: Vec<HistoryEntry> = match old {
                    Some(b) => get_json("desired", &b)?,
                    None => Vec::new(),
                };
                list.push(HistoryEntry {
                    version,
                    value: u.value.clone(),
                    ts: now,
                    origin: u.origin,
                });
                let excess = list.len().saturating_sub(history_len);
                list.drain(..excess);
                let row = to_json(&list);
                ctx.charge_state(old_cost, cost(key, row.len()))?;
                history.insert(key, row.as_slice())?;
            }
            if let Ok(value) = crate::model::change::encode_value(&u.key, &u.value) {
                changes.push(NewChange {
                    key: u.key.clone(),
                    value,
                    ts: Some(now),
                    origin: u.origin,
                });
            }
        }
        // What the reported rows of these changes will add.
        let mut extra = 0u64;
        for c in &changes {
            let len = crate::store::record::exact_len(now, &c.key, c.value.len(), c.origin.tag());
            let new = crate::store::row_cost(c.key.len(), len + 8);
            extra += new.saturating_sub(ctx.reported_cost(&c.key)?);
        }
        // History is a bounded log: past the store's bound, the oldest entries of these
        // keys go first (the newest entry of each stays).
        for u in updates {
            if !ctx.state_over(extra) {
                break;
            }
            trim_history(ctx, &mut history, &u.key, extra)?;
        }
    }
    // Queued like any report; a full `reject` store refuses them (counted), never the result.
    let _ = ctx.append(&changes)?;
    Ok(())
}

/// Drops `key`'s oldest history entries while the state (plus `extra` bytes to come) is over
/// its allowance, keeping the newest.
fn trim_history(
    ctx: &mut crate::store::TxnCtx<'_, '_>,
    history: &mut redb::Table<&str, &[u8]>,
    key: &str,
    extra: u64,
) -> Result<(), redb::Error> {
    let Some(old) = history.get(key)?.map(|v| v.value().to_vec()) else {
        return Ok(());
    };
    let mut list: Vec<HistoryEntry> = get_json("desired", &old)?;
    let mut len = old.len();
    while ctx.state_over(extra) && list.len() > 1 {
        list.remove(0);
        let shorter = to_json(&list).len();
        ctx.charge_state(
            crate::store::row_cost(key.len(), len),
            crate::store::row_cost(key.len(), shorter),
        )?;
        len = shorter;
    }
    if len != old.len() {
        history.insert(key, to_json(&list).as_slice())?;
    }
    Ok(())
}

/// Why [`reset_version`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResetRefused {
    #[error("{inbox_len} desired document(s) are being applied; try again when they are done")]
    Applying { inbox_len: u64 },
    #[error("version {to} is not below the current desired version {accepted}")]
    NotBelow { to: u64, accepted: u64 },
}

/// Sets the accepted and applied versions back to `to` (the `desired-reset` command):
/// documents above `to` are taken in again. `Ok(Err(why))` when refused: a document is
/// being applied (its version is in the inbox), or `to` is not below the accepted version.
/// Results kept for versions above `to` are dropped (they would answer a new document of
/// that version as a duplicate). Returns the version it replaced.
pub async fn reset_version(
    outbox: &Outbox,
    to: u64,
) -> Result<Result<u64, ResetRefused>, StoreError> {
    outbox
        .transact(move |ctx| {
            let inbox_len = {
                let inbox = ctx.txn.open_table(INBOX)?;
                redb::ReadableTableMetadata::len(&inbox)?
            };
            if inbox_len > 0 {
                return Ok(Err(ResetRefused::Applying { inbox_len }));
            }
            let mut meta = ctx.txn.open_table(META)?;
            let accepted = meta_get(&meta, "accepted")?.unwrap_or(0);
            if to >= accepted {
                return Ok(Err(ResetRefused::NotBelow { to, accepted }));
            }
            meta.insert("accepted", to)?;
            meta.insert("applied", to)?;
            drop(meta);
            let mut results = ctx.txn.open_table(RESULTS)?;
            if let Some(from) = to.checked_add(1) {
                for item in results.extract_from_if(from.., |_, _| true)? {
                    item?;
                }
            }
            Ok(Ok(accepted))
        })
        .await
}

/// Deletes a published result.
pub async fn published(outbox: &Outbox, n: u64) -> Result<(), StoreError> {
    outbox
        .transact(move |ctx| {
            ctx.txn.open_table(RESULT_OUTBOX)?.remove(n)?;
            Ok(())
        })
        .await
}

/// Documents taken in and not finished, oldest version first.
pub fn inbox(outbox: &Outbox) -> Result<Vec<InboxEntry>, StoreError> {
    read_all(outbox, INBOX)
}

/// Results not yet published, oldest first.
#[cfg(test)]
pub fn pending_results(outbox: &Outbox) -> Result<Vec<PendingResult>, StoreError> {
    read_all(outbox, RESULT_OUTBOX)
}

/// At most `max` results not yet published from number `from` on, oldest first: what the
/// link reads as room frees up (cost in proportion to `max`, not to the table).
pub fn results_from(
    outbox: &Outbox,
    from: u64,
    max: usize,
) -> Result<Vec<PendingResult>, StoreError> {
    let txn = outbox.read()?;
    let table = match txn.open_table(RESULT_OUTBOX) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::from(e)),
    };
    let mut out = Vec::new();
    for item in table.range(from..)?.take(max) {
        let (_, v) = item?;
        out.push(get_json("desired", v.value())?);
    }
    Ok(out)
}

fn read_all<T: for<'de> Deserialize<'de>>(
    outbox: &Outbox,
    def: TableDefinition<u64, &[u8]>,
) -> Result<Vec<T>, StoreError> {
    let txn = outbox.read()?;
    let table = match txn.open_table(def) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::from(e)),
    };
    let mut out = Vec::new();
    for item in table.iter()? {
        let (_, v) = item?;
        out.push(get_json("desired", v.value())?);
    }
    Ok(out)
}

/// The last applied version.
pub fn applied_version(outbox: &Outbox) -> Result<Option<u64>, StoreError> {
    meta_version(outbox, "applied")
}

/// The highest version taken in (applied, or waiting to be applied).
pub fn accepted_version(outbox: &Outbox) -> Result<Option<u64>, StoreError> {
    meta_version(outbox, "accepted")
}

fn meta_version(outbox: &Outbox, name: &str) -> Result<Option<u64>, StoreError> {
    let txn = outbox.read()?;
    match txn.open_table(META) {
        Ok(t) => Ok(meta_get(&t, name)?),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The desired state (one key or all).
pub fn state(
    outbox: &Outbox,
    key: Option<&str>,
) -> Result<std::collections::BTreeMap<String, StateEntry>, StoreError> {
    let txn = outbox.read()?;
    let table = match txn.open_table(STATE) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Default::default()),
        Err(e) => return Err(e.into()),
    };
    let mut out = std::collections::BTreeMap::new();
    match key {
        Some(k) => {
            if let Some(v) = table.get(k)? {
                out.insert(k.to_owned(), get_json("desired", v.value())?);
            }
        }
        None => {
            for item in table.iter()? {
                let (k, v) = item?;
                out.insert(k.value().to_owned(), get_json("desired", v.value())?);
            }
        }
    }
    Ok(out)
}

/// A key's history, newest last.
pub fn history(outbox: &Outbox, key: &str) -> Result<Vec<HistoryEntry>, StoreError> {
    let txn = outbox.read()?;
    let table = match txn.open_table(HISTORY) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    Ok(match table.get(key)? {
        Some(v) => get_json("desired", v.value())?,
        None => Vec::new(),
    })
}

/// The device's latest reported change of `key` (not one the agent made), and whether it
/// is still queued (the cloud has not seen it yet).
#[derive(Debug, Clone, PartialEq)]
pub struct LocalChange {
    pub value: Value,
    pub ts: u64,
    pub queued: bool,
}

pub fn local_change(outbox: &Outbox, key: &str) -> Result<Option<LocalChange>, StoreError> {
    let Some((seq, r)) = outbox.reported_raw(key)? else {
        return Ok(None);
    };
    let Ok(rec) = crate::store::record::decode(&r) else {
        return Ok(None);
    };
    if rec.origin.is_some() {
        return Ok(None);
    }
    let value =
        crate::model::change::decode_value(rec.value).map_err(|e| StoreError::Io(e.to_string()))?;
    Ok(Some(LocalChange {
        value,
        ts: rec.ts,
        queued: outbox.is_queued(seq)?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use crate::store::test_outbox as open;

    fn entry(version: u64) -> InboxEntry {
        InboxEntry {
            version,
            ts: None,
            state: vec![("k".into(), Ok(json!(1)))],
            json: true,
            received: 1,
            applying: false,
        }
    }

    #[tokio::test]
    async fn a_version_the_cloud_cannot_exceed_is_reset_by_the_operator() {
        let dir = tempfile::tempdir().unwrap();
        let o = open(dir.path());
        let max = u64::MAX;
        assert_eq!(
            receive(&o, entry(max), vec![]).await.unwrap(),
            Received::Accepted
        );
        // Refused while the document is in the inbox.
        assert!(reset_version(&o, 0).await.unwrap().is_err());
        finish(&o, max, vec![], json!({"version": max}), Encoding::Json, 10)
            .await
            .unwrap();
        assert_eq!(
            receive(&o, entry(5), vec![]).await.unwrap(),
            Received::Stale { current: max }
        );
        assert!(
            reset_version(&o, max).await.unwrap().is_err(),
            "not below the current one"
        );
        assert_eq!(reset_version(&o, 3).await.unwrap(), Ok(max));
        assert_eq!(applied_version(&o).unwrap(), Some(3));
        assert_eq!(
            receive(&o, entry(3), vec![]).await.unwrap(),
            Received::Duplicate,
            "the version it was reset to counts as taken in"
        );
        assert_eq!(
            receive(&o, entry(5), vec![]).await.unwrap(),
            Received::Accepted
        );
        o.shutdown().await;
    }
}

#[cfg(test)]
mod bound_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::store::{StoreOptions, WhenFull};
    use serde_json::json;

    fn open(dir: &std::path::Path, max_bytes: u64) -> Outbox {
        Outbox::open(&StoreOptions {
            path: dir.join("store.redb"),
            max_bytes,
            when_full: WhenFull::DropOldest,
            cache_size: 1 << 20,
        })
        .unwrap()
    }

    /// `state_bytes` as the rows say: reported rows, state, history, inbox reservations.
    fn recount(outbox: &Outbox, keys: &[&str]) -> u64 {
        let mut total = 0;
        for k in keys {
            if let Some((_, rec)) = outbox.reported_raw(k).unwrap() {
                total += row_cost(k.len(), rec.len() + 8);
            }
        }
        let txn = outbox.read().unwrap();
        for def in [STATE, HISTORY] {
            if let Ok(t) = txn.open_table(def) {
                for item in t.iter().unwrap() {
                    let (k, v) = item.unwrap();
                    total += row_cost(k.value().len(), v.value().len());
                }
            }
        }
        if let Ok(t) = txn.open_table(RESERVED) {
            for item in t.iter().unwrap() {
                total += item.unwrap().1.value();
            }
        }
        total
    }

    fn doc(version: u64, state: Vec<(&str, Value)>) -> InboxEntry {
        InboxEntry {
            version,
            ts: None,
            state: state
                .into_iter()
                .map(|(k, v)| (k.to_owned(), Ok(v)))
                .collect(),
            json: true,
            received: now_ms(),
            applying: false,
        }
    }

    async fn apply(outbox: &Outbox, version: u64, history: usize) {
        let e = inbox(outbox)
            .unwrap()
            .into_iter()
            .find(|e| e.version == version)
            .unwrap();
        let updates = e
            .state
            .iter()
            .filter_map(|(k, v)| {
                v.as_ref().ok().map(|v| KeyUpdate {
                    key: k.clone(),
                    value: v.clone(),
                    origin: Origin::Cloud,
                })
            })
            .collect();
        finish(outbox, version, updates, json!({}), Encoding::Json, history)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_key_that_does_not_fit_is_refused_and_the_rest_accounted_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let max = 512 * 1024;
        let outbox = open(dir.path(), max);
        let big = json!("b".repeat(30_000));
        let keys = ["a", "b1", "b2", "b3", "b4", "b5"];
        // A new 30 KB key reserves 4 × 30 KB (state, history, reported, inbox): two fit in
        // the 256 KB the state may take, not three.
        let d = doc(
            1,
            vec![
                ("a", json!(1)),
                ("b1", big.clone()),
                ("b2", big.clone()),
                ("b3", big.clone()),
            ],
        );
        assert_eq!(
            receive(&outbox, d, vec![]).await.unwrap(),
            Received::Accepted
        );
        let taken = &inbox(&outbox).unwrap()[0];
        let refused: Vec<&str> = taken
            .state
            .iter()
            .filter(|(_, v)| v.is_err())
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(refused, ["b3"]);
        let err = taken.state[3].1.as_ref().unwrap_err();
        assert!(err.starts_with("store-full: "), "{err}");
        let s = outbox.stats();
        assert!(s.state_bytes <= max / 2, "{s:?}");
        assert_eq!(s.state_bytes, recount(&outbox, &keys));
        // Finishing releases the reservation and charges what was written (less).
        apply(&outbox, 1, 10).await;
        let after = outbox.stats().state_bytes;
        assert!(after < s.state_bytes, "{after} vs {}", s.state_bytes);
        assert_eq!(after, recount(&outbox, &keys));
        // The same key again fits, its history trimmed as needed; a new one still not.
        for v in 2..12 {
            let d = doc(v, vec![("b1", big.clone()), ("b4", big.clone())]);
            receive(&outbox, d, vec![]).await.unwrap();
            let taken = inbox(&outbox).unwrap();
            assert!(taken[0].state[1].1.is_err(), "new key b4 taken at {v}");
            apply(&outbox, v, 10).await;
            let s = outbox.stats();
            assert!(s.state_bytes <= max / 2, "{s:?}");
            assert!(s.state_bytes + s.bytes <= max, "{s:?}");
            assert_eq!(s.state_bytes, recount(&outbox, &keys));
        }
        // History is trimmed to the bound: b1 kept fewer than its 11 versions, the newest last.
        let h = history(&outbox, "b1").unwrap();
        assert!(
            h.len() < 10 && h.last().unwrap().version == 11,
            "{}",
            h.len()
        );
        // Removing a key gives its room back.
        let before = outbox.stats().state_bytes;
        receive(
            &outbox,
            doc(12, vec![("b1", Value::Null), ("b2", Value::Null)]),
            vec![],
        )
        .await
        .unwrap();
        apply(&outbox, 12, 0).await;
        assert!(outbox.stats().state_bytes < before - 100_000);
        let s = outbox.stats();
        assert_eq!(s.state_bytes, recount(&outbox, &keys));
        outbox.shutdown().await;
    }
}
