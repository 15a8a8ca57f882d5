//! The replay record of commands, in the store file beside the outbox. Every write goes
//! through [`Outbox::transact`] (one fsync'ed transaction, group-committed with the rest).
//!
//! # Tables
//! - `control_requests`: `id → entry` (JSON): the request's command, encoding, arguments and
//!   `expires` while it waits or runs; its `state` (`received`, `started`, `done`); and once
//!   done its response;
//! - `control_order`: `n → id`, in order of receipt (pruning takes the oldest first);
//! - `control_pending`: `n → id` of the entries not done yet (what the runner reads);
//! - `control_meta`: `next` (the next `n`); `clock` (the [`AgentClock`] at the last receipt).
//!
//! # Invariants
//! - A request to run is in `control_requests` and `control_pending` (durable) before its
//!   PUBACK.
//! - `received → started → done`, each step its own transaction; `started` is committed
//!   before the command can have any effect, so `started` after a restart means "maybe
//!   ran". Finishing (state `done`, the response, removal from pending, the response queued
//!   for publishing) is one transaction.
//! - Only `done` entries are pruned: past the window (counted from receipt on the
//!   [`AgentClock`], never on the wall clock) or beyond the count, oldest first.

use std::time::Instant;

use redb::{ReadableTable, ReadableTableMetadata};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::request::{self, ErrorCode};
use super::{ControlConfig, result_topic};
use crate::config::Encoding;
use crate::model::doc;
use crate::store::desired as dstore;
use crate::store::tables::control::{META, ORDER, PENDING, REQUESTS};
use crate::store::tables::{get_json, to_json};
use crate::store::{Outbox, StoreError};

/// Most entries a pruning pass looks at (beyond those it removes), so that one insert stays
/// cheap even when many old entries are still running.
const PRUNE_SCAN: usize = 256;

/// Where a recorded request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Durable, not started: runs (again) after a restart.
    Received,
    /// May have had its effect: never run again.
    Started,
    /// Answered; `response` is the answer to every later request with this id.
    Done,
}

/// A recorded request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub n: u64,
    pub id: String,
    /// The command name, as in its topic.
    pub name: String,
    pub state: State,
    /// Encoding of the request (its response goes out in the same).
    pub json: bool,
    /// Arguments, until done.
    #[serde(default)]
    pub args: Map<String, Value>,
    pub expires: Option<u64>,
    /// Unix ms of receipt.
    pub received: u64,
    /// The [`AgentClock`] at receipt: what the replay window counts from (0 in entries
    /// written before it existed: counted from the clock's start).
    #[serde(default)]
    pub clock: u64,
    /// The response (JSON form), once done.
    pub response: Option<Value>,
    /// Unix ms of the answer, once done.
    pub answered: Option<u64>,
    /// Encodings (JSON = true) of repeats of this id that arrived before it was answered:
    /// one more answer per encoding serves them all, so at most two entries (entries
    /// written before this bound may hold one per repeat: read, and deduplicated when done).
    #[serde(default)]
    pub waiting: Vec<bool>,
    /// Where its answer goes in the result outbox when not `cmd/NAME/result` (an AWS IoT
    /// job's update, [`receive_to`]); the latest delivery's, answered once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    /// With `reply`: the result-outbox number of the answer queued there last (a delivery
    /// to the same `reply` while it waits to be published queues nothing more).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued: Option<u64>,
}

impl Entry {
    pub fn encoding(&self) -> Encoding {
        if self.json {
            Encoding::Json
        } else {
            Encoding::Cbor
        }
    }

    /// Whether a repeat in this encoding already has its answer coming.
    pub fn waits(&self, json: bool) -> bool {
        self.waiting.contains(&json)
    }

    /// The encodings owed an answer besides the first, each once (JSON first).
    fn owed(&self) -> impl Iterator<Item = Encoding> + '_ {
        [(true, Encoding::Json), (false, Encoding::Cbor)]
            .into_iter()
            .filter(|(json, _)| self.waits(*json))
            .map(|(_, e)| e)
    }
}

/// A readable request arriving.
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    pub id: String,
    pub name: String,
    pub json: bool,
    pub args: Map<String, Value>,
    pub expires: Option<u64>,
    /// Set when the request is refused before running: its error response. Still only
    /// after the replay check (an id answered before gets that answer again).
    pub refusal: Option<(ErrorCode, Value)>,
}

impl Incoming {
    fn encoding(&self) -> Encoding {
        if self.json {
            Encoding::Json
        } else {
            Encoding::Cbor
        }
    }
}

/// What [`receive`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Intake {
    /// Recorded as received: the runner takes it.
    Accepted,
    /// Refused before running: its error response was queued; not recorded.
    Refused(ErrorCode),
    /// The id was answered before: that answer was queued again.
    Replayed,
    /// The id is recorded and not answered yet: its one answer follows when it is.
    InProgress,
    /// The id belongs to a request for another command: answered `bad-request`.
    Conflict { first: String },
}

/// How long and how many ids are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub window_ms: u64,
    pub max: u64,
    /// The [`AgentClock`] now.
    pub clock: u64,
}

impl Limits {
    pub fn new(cfg: &ControlConfig, clock: u64) -> Self {
        Self {
            window_ms: crate::model::change::duration_ms(cfg.replay_window),
            max: u64::try_from(cfg.replay_max).unwrap_or(u64::MAX),
            clock,
        }
    }
}

/// The clock of the replay window: milliseconds the agent ran, from the monotonic clock,
/// carried across restarts through the store (`control_meta` `clock`, written with every
/// receipt). Setting the wall clock forward (a jump of days) or back moves it not at all, so
/// a jump can neither clear the record nor keep ids for ever. Time the agent was stopped
/// (and since the last receipt before a stop) does not count: ids are kept longer, never
/// shorter; `replay_max` bounds them.
#[derive(Debug, Clone, Copy)]
pub struct AgentClock {
    base: u64,
    origin: Instant,
}

impl AgentClock {
    /// Continues from the clock stored at the last receipt (0 in a new store).
    pub fn open(outbox: &Outbox) -> Result<Self, StoreError> {
        let txn = outbox.read()?;
        let base = match txn.open_table(META) {
            Ok(t) => t.get("clock")?.map_or(0, |v| v.value()),
            Err(redb::TableError::TableDoesNotExist(_)) => 0,
            Err(e) => return Err(e.into()),
        };
        Ok(Self::starting_at(base))
    }

    pub fn starting_at(base: u64) -> Self {
        Self {
            base,
            origin: Instant::now(),
        }
    }

    pub fn now(&self) -> u64 {
        self.base
            .saturating_add(u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX))
    }
}

fn load(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    id: &str,
) -> Result<Option<Entry>, redb::Error> {
    match table.get(id)? {
        Some(v) => Ok(Some(get_json("control", v.value())?)),
        None => Ok(None),
    }
}

/// Takes in a request (see [`Intake`]); durable when it returns.
pub async fn receive(
    outbox: &Outbox,
    req: Incoming,
    limits: Limits,
    now: u64,
) -> Result<Intake, StoreError> {
    receive_to(outbox, req, None, limits, now).await
}

/// [`receive`], with the answers under `reply` instead of `cmd/NAME/result` when set (an AWS
/// IoT job: its update topic and execution version). A delivery of an id taken in and not
/// answered yet replaces the entry's `reply` (the newest execution version) and owes no
/// further answer: the one answer goes there.
pub async fn receive_to(
    outbox: &Outbox,
    req: Incoming,
    reply: Option<String>,
    limits: Limits,
    now: u64,
) -> Result<Intake, StoreError> {
    outbox
        .transact(move |ctx| {
            let txn = ctx.txn;
            let encoding = req.encoding();
            let topic = reply.clone().unwrap_or_else(|| result_topic(&req.name));
            let mut requests = txn.open_table(REQUESTS)?;
            if let Some(first) = load(&requests, &req.id)? {
                drop(requests);
                if first.name != req.name {
                    let message = format!(
                        "id {:?} was already used by a {} request; use a new id for every request",
                        req.id, first.name
                    );
                    let response = request::error(Some(&req.id), ErrorCode::BadRequest, &message);
                    dstore::queue_result(txn, &topic, &doc::encode(&response, encoding))?;
                    return Ok(Intake::Conflict { first: first.name });
                }
                let job = reply.is_some();
                let json = encoding == Encoding::Json;
                let mut first = first;
                let mut queued = None;
                let (intake, changed) = match &first.response {
                    Some(response) if first.state == State::Done => {
                        // A job's answer to this very reply that still waits to be published
                        // is not queued again.
                        let waiting = job
                            && first.reply == reply
                            && match first.queued {
                                Some(n) => dstore::result_queued(txn, n)?,
                                None => false,
                            };
                        if !waiting {
                            let n = dstore::queue_result(
                                txn,
                                &topic,
                                &doc::encode(response, encoding),
                            )?;
                            queued = Some(n);
                        }
                        (Intake::Replayed, job && !waiting)
                    }
                    // A job's one answer goes to the newest reply.
                    _ if job => (Intake::InProgress, first.reply != reply),
                    // Answered (once more per encoding) when the first one is done; a repeat
                    // in an encoding already owed an answer changes nothing.
                    _ => (Intake::InProgress, !first.waits(json)),
                };
                if changed {
                    if job {
                        first.reply = reply;
                        first.queued = queued.or(first.queued);
                    } else {
                        first.waiting.push(json);
                    }
                    txn.open_table(REQUESTS)?
                        .insert(req.id.as_str(), to_json(&first).as_slice())?;
                }
                return Ok(intake);
            }
            if let Some((code, response)) = req.refusal {
                drop(requests);
                dstore::queue_result(txn, &topic, &doc::encode(&response, encoding))?;
                return Ok(Intake::Refused(code));
            }
            let mut meta = txn.open_table(META)?;
            let n = meta.get("next")?.map_or(1, |v| v.value());
            meta.insert("next", n + 1)?;
            let clock = meta
                .get("clock")?
                .map_or(0, |v| v.value())
                .max(limits.clock);
            meta.insert("clock", clock)?;
            drop(meta);
            let entry = Entry {
                n,
                id: req.id.clone(),
                name: req.name,
                state: State::Received,
                json: req.json,
                args: req.args,
                expires: req.expires,
                received: now,
                clock: limits.clock,
                response: None,
                answered: None,
                waiting: Vec::new(),
                reply,
                queued: None,
            };
            requests.insert(req.id.as_str(), to_json(&entry).as_slice())?;
            let mut order = txn.open_table(ORDER)?;
            order.insert(n, req.id.as_str())?;
            txn.open_table(PENDING)?.insert(n, req.id.as_str())?;
            prune(&mut requests, &mut order, limits)?;
            Ok(Intake::Accepted)
        })
        .await
}

/// Removes answered entries past the window or beyond the count, oldest first.
fn prune(
    requests: &mut redb::Table<&str, &[u8]>,
    order: &mut redb::Table<u64, &str>,
    limits: Limits,
) -> Result<(), redb::Error> {
    let mut count = requests.len()?;
    let mut remove = Vec::new();
    let mut skipped = 0;
    for item in order.iter()? {
        let (n, id) = item?;
        let (n, id) = (n.value(), id.value().to_owned());
        let Some(entry) = load(requests, &id)? else {
            // An order row without its entry: drop it.
            remove.push((n, None));
            continue;
        };
        if count <= limits.max && limits.clock.saturating_sub(entry.clock) <= limits.window_ms {
            break;
        }
        if entry.state == State::Done {
            remove.push((n, Some(id)));
            count = count.saturating_sub(1);
        } else {
            skipped += 1;
            if skipped >= PRUNE_SCAN {
                break;
            }
        }
    }
    for (n, id) in remove {
        order.remove(n)?;
        if let Some(id) = id {
            requests.remove(id.as_str())?;
        }
    }
    Ok(())
}

/// Marks a received request started; `false` if it is not (or no longer) `received`.
pub async fn begin(outbox: &Outbox, id: &str) -> Result<bool, StoreError> {
    let id = id.to_owned();
    outbox
        .transact(move |ctx| {
            let mut requests = ctx.txn.open_table(REQUESTS)?;
            let Some(mut entry) = load(&requests, &id)? else {
                return Ok(false);
            };
            if entry.state != State::Received {
                return Ok(false);
            }
            entry.state = State::Started;
            requests.insert(id.as_str(), to_json(&entry).as_slice())?;
            Ok(true)
        })
        .await
}

/// Records the answer of a request and queues it for publishing, in one transaction.
pub async fn finish(
    outbox: &Outbox,
    id: &str,
    response: Value,
    now: u64,
) -> Result<(), StoreError> {
    let id = id.to_owned();
    outbox
        .transact(move |ctx| {
            let txn = ctx.txn;
            let mut requests = txn.open_table(REQUESTS)?;
            let Some(mut entry) = load(&requests, &id)? else {
                return Ok(());
            };
            if entry.state == State::Done {
                return Ok(());
            }
            let topic = entry
                .reply
                .clone()
                .unwrap_or_else(|| result_topic(&entry.name));
            // The first answer in the request's encoding, then one per encoding of repeats.
            let mut payloads = vec![doc::encode(&response, entry.encoding())];
            payloads.extend(entry.owed().map(|e| doc::encode(&response, e)));
            entry.state = State::Done;
            entry.response = Some(response);
            entry.answered = Some(now);
            entry.args = Map::new();
            entry.waiting = Vec::new();
            let mut first = None;
            for payload in &payloads {
                first = first.or(Some(dstore::queue_result(txn, &topic, payload)?));
            }
            if entry.reply.is_some() {
                entry.queued = first;
            }
            requests.insert(id.as_str(), to_json(&entry).as_slice())?;
            drop(requests);
            txn.open_table(PENDING)?.remove(entry.n)?;
            Ok(())
        })
        .await
}

/// Requests not answered yet, in order of receipt.
pub fn pending(outbox: &Outbox) -> Result<Vec<Entry>, StoreError> {
    let txn = outbox.read()?;
    let pending = match txn.open_table(PENDING) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let requests = txn.open_table(REQUESTS)?;
    let mut out = Vec::new();
    for item in pending.iter()? {
        let (_, id) = item?;
        if let Some(e) = load(&requests, id.value())? {
            out.push(e);
        }
    }
    Ok(out)
}

/// Whether `id` is recorded for `name`, not answered yet, and already owes an answer in
/// this encoding: a repeat that changes nothing, taken in without a write transaction (a
/// flood of repeats costs a read each, not an fsync each). Racing with [`finish`] is
/// harmless: an answer that went out meanwhile was that answer.
pub fn repeat_owed(outbox: &Outbox, id: &str, name: &str, json: bool) -> Result<bool, StoreError> {
    Ok(lookup(outbox, id)?
        .is_some_and(|e| e.name == name && e.state != State::Done && e.waits(json)))
}

/// The record of one id.
pub fn lookup(outbox: &Outbox, id: &str) -> Result<Option<Entry>, StoreError> {
    let txn = outbox.read()?;
    match txn.open_table(REQUESTS) {
        Ok(t) => Ok(load(&t, id)?),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
/// How many ids are recorded.
pub fn count(outbox: &Outbox) -> Result<u64, StoreError> {
    let txn = outbox.read()?;
    match txn.open_table(REQUESTS) {
        Ok(t) => Ok(t.len()?),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use crate::store::test_outbox as open;

    fn incoming(id: &str, name: &str) -> Incoming {
        Incoming {
            id: id.into(),
            name: name.into(),
            json: true,
            args: Map::new(),
            expires: None,
            refusal: None,
        }
    }

    const L: Limits = Limits {
        window_ms: 1000,
        max: 100,
        clock: 0,
    };

    /// Published results as `(topic, JSON)`.
    fn results(outbox: &Outbox) -> Vec<(String, Value)> {
        dstore::pending_results(outbox)
            .unwrap()
            .into_iter()
            .map(|r| {
                let v = if r.payload.first() == Some(&b'{') {
                    serde_json::from_slice(&r.payload).unwrap()
                } else {
                    ciborium::from_reader(r.payload.as_slice()).unwrap()
                };
                (r.topic, v)
            })
            .collect()
    }

    #[tokio::test]
    async fn a_request_goes_received_started_done_and_is_replayed_in_the_new_encoding() {
        let dir = tempfile::tempdir().unwrap();
        let o = open(dir.path());
        let r = receive(&o, incoming("a", "ping"), L, 10).await.unwrap();
        assert_eq!(r, Intake::Accepted);
        let p = pending(&o).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].state, State::Received);
        // A second delivery before the answer: nothing run twice; it is answered with the
        // first when that is done.
        assert_eq!(
            receive(&o, incoming("a", "ping"), L, 11).await.unwrap(),
            Intake::InProgress
        );
        assert!(begin(&o, "a").await.unwrap());
        assert!(!begin(&o, "a").await.unwrap(), "begins only once");
        assert_eq!(pending(&o).unwrap()[0].state, State::Started);
        let resp = request::ok("a", json!({"pong": true}));
        finish(&o, "a", resp.clone(), 12).await.unwrap();
        assert!(pending(&o).unwrap().is_empty());
        assert_eq!(
            results(&o),
            vec![
                ("cmd/ping/result".into(), resp.clone()),
                ("cmd/ping/result".into(), resp.clone())
            ]
        );
        // Replayed in CBOR.
        let mut again = incoming("a", "ping");
        again.json = false;
        assert_eq!(receive(&o, again, L, 13).await.unwrap(), Intake::Replayed);
        let all = dstore::pending_results(&o).unwrap();
        assert_eq!(all.len(), 3);
        assert_ne!(all[2].payload.first(), Some(&b'{'));
        assert_eq!(results(&o)[2].1, resp);
        // Same id, other command: bad-request, the record unchanged.
        let r = receive(&o, incoming("a", "status"), L, 14).await.unwrap();
        assert_eq!(
            r,
            Intake::Conflict {
                first: "ping".into()
            }
        );
        let (topic, v) = results(&o).pop().unwrap();
        assert_eq!(topic, "cmd/status/result");
        assert_eq!(v["error"]["code"], "bad-request");
        assert_eq!(lookup(&o, "a").unwrap().unwrap().response, Some(resp));
        o.shutdown().await;
    }

    #[tokio::test]
    async fn repeats_while_running_owe_one_answer_per_encoding_and_leave_the_entry_alone() {
        let dir = tempfile::tempdir().unwrap();
        let o = open(dir.path());
        receive(&o, incoming("a", "sync"), L, 1).await.unwrap();
        assert!(!repeat_owed(&o, "a", "sync", true).unwrap());
        for i in 0..50 {
            let mut again = incoming("a", "sync");
            again.json = i % 5 != 0;
            assert_eq!(receive(&o, again, L, 2).await.unwrap(), Intake::InProgress);
        }
        let entry = lookup(&o, "a").unwrap().unwrap();
        assert_eq!(entry.waiting.len(), 2, "one flag per encoding");
        assert!(repeat_owed(&o, "a", "sync", true).unwrap());
        assert!(repeat_owed(&o, "a", "sync", false).unwrap());
        assert!(
            !repeat_owed(&o, "a", "ping", true).unwrap(),
            "other command"
        );
        finish(&o, "a", request::ok("a", json!({})), 3)
            .await
            .unwrap();
        // The first answer, one more in JSON, one in CBOR.
        let all = dstore::pending_results(&o).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[2].payload.first().map(|b| *b == b'{'), Some(false));
        assert!(lookup(&o, "a").unwrap().unwrap().waiting.is_empty());
        assert!(!repeat_owed(&o, "a", "sync", true).unwrap(), "done");
        o.shutdown().await;
    }

    #[tokio::test]
    async fn an_entry_written_with_one_flag_per_repeat_still_loads_and_is_answered_once_per_encoding()
     {
        let dir = tempfile::tempdir().unwrap();
        let o = open(dir.path());
        receive(&o, incoming("old", "sync"), L, 1).await.unwrap();
        // As the unbounded code wrote it: one flag per repeat.
        let mut entry = lookup(&o, "old").unwrap().unwrap();
        entry.waiting = [true, true, false, true, false].repeat(100);
        let bytes = to_json(&entry);
        o.transact(move |ctx| {
            ctx.txn
                .open_table(REQUESTS)?
                .insert("old", bytes.as_slice())?;
            Ok(())
        })
        .await
        .unwrap();
        assert_eq!(lookup(&o, "old").unwrap().unwrap().waiting.len(), 500);
        finish(&o, "old", request::ok("old", json!({})), 3)
            .await
            .unwrap();
        assert_eq!(dstore::pending_results(&o).unwrap().len(), 3);
        o.shutdown().await;
    }

    #[tokio::test]
    async fn a_reply_topic_takes_the_answers_once_and_the_latest_delivery_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let o = open(dir.path());
        let to = |t: &str| Some(t.to_owned());
        let r = receive_to(&o, incoming("j1", "ping"), to("jobs/j1/2"), L, 1);
        assert_eq!(r.await.unwrap(), Intake::Accepted);
        // Delivered again while not answered (a reconnect): the newer reply, no extra answer.
        let r = receive_to(&o, incoming("j1", "ping"), to("jobs/j1/3"), L, 2);
        assert_eq!(r.await.unwrap(), Intake::InProgress);
        let entry = lookup(&o, "j1").unwrap().unwrap();
        assert_eq!(entry.reply.as_deref(), Some("jobs/j1/3"));
        assert!(entry.waiting.is_empty());
        assert!(begin(&o, "j1").await.unwrap());
        let resp = request::ok("j1", json!({"pong": true}));
        finish(&o, "j1", resp.clone(), 3).await.unwrap();
        assert_eq!(results(&o), vec![("jobs/j1/3".into(), resp.clone())]);
        // Delivered again to the same reply while its answer waits: nothing more queued.
        let r = receive_to(&o, incoming("j1", "ping"), to("jobs/j1/3"), L, 4);
        assert_eq!(r.await.unwrap(), Intake::Replayed);
        assert_eq!(results(&o).len(), 1);
        // Published, delivered again: queued again.
        let n = dstore::pending_results(&o).unwrap()[0].n;
        dstore::published(&o, n).await.unwrap();
        let r = receive_to(&o, incoming("j1", "ping"), to("jobs/j1/3"), L, 4);
        assert_eq!(r.await.unwrap(), Intake::Replayed);
        assert_eq!(results(&o), vec![("jobs/j1/3".into(), resp.clone())]);
        // To another reply (a newer execution version): the recorded answer there.
        let r = receive_to(&o, incoming("j1", "ping"), to("jobs/j1/4"), L, 4);
        assert_eq!(r.await.unwrap(), Intake::Replayed);
        assert_eq!(results(&o)[1], ("jobs/j1/4".into(), resp));
        // Refusals go there too; entries without a reply keep their JSON unchanged.
        let mut bad = incoming("j2", "nope");
        bad.refusal = Some((
            ErrorCode::UnknownCommand,
            request::error(Some("j2"), ErrorCode::UnknownCommand, "m"),
        ));
        receive_to(&o, bad, to("jobs/j2/2"), L, 5).await.unwrap();
        assert_eq!(results(&o)[2].0, "jobs/j2/2");
        receive(&o, incoming("c1", "ping"), L, 6).await.unwrap();
        let plain = to_json(&lookup(&o, "c1").unwrap().unwrap());
        assert!(!String::from_utf8_lossy(&plain).contains("reply"));
        o.shutdown().await;
    }

    #[tokio::test]
    async fn refusals_are_answered_and_not_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let o = open(dir.path());
        let mut req = incoming("x", "nope");
        req.refusal = Some((
            ErrorCode::UnknownCommand,
            request::error(Some("x"), ErrorCode::UnknownCommand, "m"),
        ));
        assert_eq!(
            receive(&o, req, L, 1).await.unwrap(),
            Intake::Refused(ErrorCode::UnknownCommand)
        );
        assert_eq!(lookup(&o, "x").unwrap(), None);
        assert_eq!(results(&o)[0].0, "cmd/nope/result");
        o.shutdown().await;
    }

    #[tokio::test]
    async fn states_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let o = open(dir.path());
        receive(&o, incoming("r", "sync"), L, 1).await.unwrap();
        receive(&o, incoming("s", "sync"), L, 2).await.unwrap();
        assert!(begin(&o, "s").await.unwrap());
        o.shutdown().await;
        drop(o);
        let o = open(dir.path());
        let p = pending(&o).unwrap();
        let states: Vec<(&str, State)> = p.iter().map(|e| (e.id.as_str(), e.state)).collect();
        assert_eq!(states, [("r", State::Received), ("s", State::Started)]);
        o.shutdown().await;
    }

    #[tokio::test]
    async fn pruning_keeps_the_window_and_the_count_and_never_drops_unanswered_ones() {
        let dir = tempfile::tempdir().unwrap();
        let o = open(dir.path());
        // The agent clock at `t`; the wall clock the same here.
        let at = |t| Limits {
            window_ms: 1000,
            max: 3,
            clock: t,
        };
        // "busy" stays running; the others are answered.
        receive(&o, incoming("busy", "sync"), at(0), 0)
            .await
            .unwrap();
        assert!(begin(&o, "busy").await.unwrap());
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            let t = i as u64 + 1;
            receive(&o, incoming(id, "ping"), at(t), t).await.unwrap();
            finish(&o, id, request::ok(id, json!({})), t).await.unwrap();
        }
        // Four recorded, max 3: "a" (the oldest answered) goes, "busy" stays.
        assert!(lookup(&o, "a").unwrap().is_none());
        assert!(lookup(&o, "busy").unwrap().is_some());
        assert_eq!(count(&o).unwrap(), 3);
        // Past the window of "b" and "c": both go on the next insert.
        receive(&o, incoming("d", "ping"), at(2000), 2000)
            .await
            .unwrap();
        assert!(lookup(&o, "b").unwrap().is_none());
        assert!(lookup(&o, "c").unwrap().is_none());
        assert!(lookup(&o, "busy").unwrap().is_some());
        assert!(lookup(&o, "d").unwrap().is_some());
        // Within the window and the count: kept.
        receive(&o, incoming("e", "ping"), at(2001), 2001)
            .await
            .unwrap();
        assert!(lookup(&o, "d").unwrap().is_some());
        o.shutdown().await;
    }

    #[tokio::test]
    async fn a_wall_clock_jump_does_not_clear_the_replay_record_and_the_clock_carries_over() {
        let dir = tempfile::tempdir().unwrap();
        let o = open(dir.path());
        let day = 86_400_000;
        let at = |clock| Limits {
            window_ms: day,
            max: 100,
            clock,
        };
        let wall = 1_764_150_000_000;
        for (i, id) in ["a", "b"].iter().enumerate() {
            let t = i as u64;
            receive(&o, incoming(id, "ping"), at(t), wall + t)
                .await
                .unwrap();
            finish(&o, id, request::ok(id, json!({})), wall)
                .await
                .unwrap();
        }
        // The wall clock jumps 30 days ahead; the agent ran 10 s more.
        receive(&o, incoming("c", "ping"), at(10_000), wall + 30 * day)
            .await
            .unwrap();
        assert!(lookup(&o, "a").unwrap().is_some(), "kept across the jump");
        assert_eq!(
            receive(&o, incoming("a", "ping"), at(10_001), wall + 30 * day)
                .await
                .unwrap(),
            Intake::Replayed,
            "answered from the record, not run again"
        );
        // The clock carries over a restart: a day of agent time later they go.
        assert!(AgentClock::open(&o).unwrap().now() >= 10_000);
        receive(&o, incoming("d", "ping"), at(10_000 + day + 1), wall)
            .await
            .unwrap();
        assert!(lookup(&o, "a").unwrap().is_none());
        assert!(lookup(&o, "b").unwrap().is_none());
        assert!(lookup(&o, "d").unwrap().is_some());
        o.shutdown().await;
    }
}
