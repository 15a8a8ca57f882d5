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
//! - `result_outbox`: `n → {topic suffix, payload}`: results not yet PUBACKed.
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

use crate::change::{NewChange, Origin, now_ms};
use crate::config::Encoding;
use crate::store::{Outbox, StoreError};

const META: TableDefinition<&str, u64> = TableDefinition::new("desired_meta");
const INBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("desired_inbox");
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("desired_state");
const HISTORY: TableDefinition<&str, &[u8]> = TableDefinition::new("desired_history");
const RESULTS: TableDefinition<u64, &[u8]> = TableDefinition::new("desired_results");
const RESULT_OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("result_outbox");

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

fn get_json<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, redb::Error> {
    serde_json::from_slice(bytes)
        .map_err(|e| redb::Error::Corrupted(format!("desired record: {e}")))
}

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
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
                        let mut result: Value = get_json(&bytes)?;
                        result["status"] = Value::from("duplicate");
                        let payload = super::doc::encode(&result, encoding);
                        queue_result(ctx.txn, "desired/result", &payload)?;
                    }
                    return Ok(Received::Duplicate);
                }
                _ => {}
            }
            meta.insert("accepted", version)?;
            drop(meta);
            ctx.txn
                .open_table(INBOX)?
                .insert(version, to_json(&entry).as_slice())?;
            Ok(Received::Accepted)
        })
        .await
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
                let mut e: InboxEntry = get_json(&bytes)?;
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
            apply_updates(ctx, version, &updates, history_len)?;
            ctx.txn.open_table(INBOX)?.remove(version)?;
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
            let payload = super::doc::encode(&result, encoding);
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
        for u in updates {
            if u.value.is_null() {
                state.remove(u.key.as_str())?;
            } else {
                let e = StateEntry {
                    value: u.value.clone(),
                    version,
                    ts: now,
                };
                state.insert(u.key.as_str(), to_json(&e).as_slice())?;
            }
            if history_len > 0 {
                let old = history.get(u.key.as_str())?.map(|v| v.value().to_vec());
                let mut list: Vec<HistoryEntry> = match old {
                    Some(b) => get_json(&b)?,
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
                history.insert(u.key.as_str(), to_json(&list).as_slice())?;
            }
            if let Ok(value) = crate::change::encode_value(&u.key, &u.value) {
                changes.push(NewChange {
                    key: u.key.clone(),
                    value,
                    ts: Some(now),
                    origin: u.origin,
                });
            }
        }
    }
    // Queued like any report; a full `reject` store refuses them (counted), never the result.
    let _ = ctx.append(&changes)?;
    Ok(())
}

/// Sets the accepted and applied versions back to `to` (the `desired-reset` command):
/// documents above `to` are taken in again. `Ok(Err(why))` when refused: a document is
/// being applied (its version is in the inbox), or `to` is not below the accepted version.
/// Results kept for versions above `to` are dropped (they would answer a new document of
/// that version as a duplicate). Returns the version it replaced.
pub async fn reset_version(outbox: &Outbox, to: u64) -> Result<Result<u64, String>, StoreError> {
    outbox
        .transact(move |ctx| {
            let inbox_len = {
                let inbox = ctx.txn.open_table(INBOX)?;
                redb::ReadableTableMetadata::len(&inbox)?
            };
            if inbox_len > 0 {
                return Ok(Err(format!(
                    "{inbox_len} desired document(s) are being applied; try again when they are done"
                )));
            }
            let mut meta = ctx.txn.open_table(META)?;
            let accepted = meta_get(&meta, "accepted")?.unwrap_or(0);
            if to >= accepted {
                return Ok(Err(format!(
                    "version {to} is not below the current desired version {accepted}"
                )));
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
        out.push(get_json(v.value())?);
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
        out.push(get_json(v.value())?);
    }
    Ok(out)
}

/// The last applied version.
pub fn applied_version(outbox: &Outbox) -> Result<Option<u64>, StoreError> {
    let txn = outbox.read()?;
    match txn.open_table(META) {
        Ok(t) => Ok(meta_get(&t, "applied")?),
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
                out.insert(k.to_owned(), get_json(v.value())?);
            }
        }
        None => {
            for item in table.iter()? {
                let (k, v) = item?;
                out.insert(k.value().to_owned(), get_json(v.value())?);
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
        Some(v) => get_json(v.value())?,
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
    let value = crate::change::decode_value(rec.value).map_err(StoreError::Io)?;
    Ok(Some(LocalChange {
        value,
        ts: rec.ts,
        queued: outbox.is_queued(seq)?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{StoreOptions, WhenFull};
    use serde_json::json;

    fn open(dir: &std::path::Path) -> Outbox {
        Outbox::open(&StoreOptions {
            path: dir.join("s.redb"),
            max_bytes: 1 << 20,
            when_full: WhenFull::Reject,
            cache_size: 1 << 20,
        })
        .unwrap()
    }

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
