//! Applying desired documents: one document at a time in version order, its keys' handlers
//! concurrently (up to `desired.concurrency`), outside the MQTT event path.
//!
//! Life of a document: taken in durably before its PUBACK ([`Applier::receive`]) → marked
//! applying → keys planned ([`super::plan`]) and handlers run → finished in one transaction
//! (state, history, reported changes with origin `cloud`, applied version, result queued for
//! `P/D/desired/result`). After a crash, a document that was applying is finished with its
//! keys `failed` (at most once); one that was only received is applied normally.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::sync::{Notify, Semaphore, watch};
use tokio_util::sync::CancellationToken;

use super::handlers::{self, Outcome};
use super::plan::{KeyPlan, believed, plan_key};
use super::watch::Watchers;
use crate::config::Encoding;
use crate::config::{Config, DesiredConfig, HandlerKind};
use crate::model::change::{Origin, now_ms};
use crate::model::doc::{self, Limits};
use crate::store::desired::{self as dstore, InboxEntry, KeyUpdate, Received};
use crate::store::{Outbox, StoreError};

/// Why [`Applier::rollback`] failed; the text is the command's and the socket's answer.
#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    #[error("key {key} has no value of version {version} in its history (known: {known:?})")]
    NoSuchVersion {
        key: String,
        version: u64,
        known: Vec<u64>,
    },
    /// The handler failed or refused the value (its reason).
    #[error("{0}")]
    Handler(String),
    #[error("rollback did not apply")]
    NotApplied,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Task(#[from] tokio::task::JoinError),
}

/// The socket server hands the text on as it is.
/// Runs desired documents; cheap to clone.
#[derive(Clone, Debug)]
pub struct Applier {
    outbox: Outbox,
    /// The running config (it changes on reload); only `[desired]` is read.
    config: watch::Receiver<Arc<Config>>,
    watchers: Watchers,
    /// New documents in the inbox.
    wake: Arc<Notify>,
    /// New results to publish (the link listens).
    pub results: Arc<Notify>,
}

/// One key's result in an apply result document.
#[derive(Debug, Clone, PartialEq)]
enum KeyStatus {
    /// Its handler applied it.
    Applied,
    /// No handler matches the key: only recorded (desired state, history, reported), which
    /// counts as applied (docs/PROTOCOL.md §5.3).
    Recorded,
    Rejected(String),
    Conflict,
    Failed(String),
}

impl KeyStatus {
    /// The key's entry in the result's `keys`.
    fn entry(&self) -> Value {
        match self {
            KeyStatus::Applied => json!({"status": "applied"}),
            KeyStatus::Recorded => json!({"status": "applied", "handler": "none"}),
            KeyStatus::Conflict => json!({"status": "conflict"}),
            KeyStatus::Rejected(e) => json!({"status": "rejected", "error": e}),
            KeyStatus::Failed(e) => json!({"status": "failed", "error": e}),
        }
    }

    fn applied(&self) -> bool {
        matches!(self, KeyStatus::Applied | KeyStatus::Recorded)
    }
}

/// The document's `status` from its keys' (docs/PROTOCOL.md §5.3): `applied` when every key
/// applied (or there was none), `partial` when some did, `failed` when every key failed,
/// else (none applied, some rejected or conflicting) `rejected`.
fn document_status<'a>(keys: impl IntoIterator<Item = &'a KeyStatus>) -> &'static str {
    let (mut applied, mut failed, mut other) = (0usize, 0usize, 0usize);
    for k in keys {
        match k {
            k if k.applied() => applied += 1,
            KeyStatus::Failed(_) => failed += 1,
            _ => other += 1,
        }
    }
    match (applied, failed, other) {
        (_, 0, 0) => "applied",
        (0, _, 0) => "failed",
        (0, _, _) => "rejected",
        _ => "partial",
    }
}

impl Applier {
    pub fn new(outbox: Outbox, config: watch::Receiver<Arc<Config>>, watchers: Watchers) -> Self {
        Self {
            outbox,
            config,
            watchers,
            wake: Arc::new(Notify::new()),
            results: Arc::new(Notify::new()),
        }
    }

    pub fn watchers(&self) -> &Watchers {
        &self.watchers
    }

    /// `[desired]` as it is now (it changes on reload).
    fn cfg(&self) -> Arc<DesiredConfig> {
        Arc::new(self.config.borrow().desired.clone())
    }

    /// `[desired] max_future_ts` as it is now: reports with a later `ts` are refused.
    pub fn max_future_ts(&self) -> std::time::Duration {
        self.config.borrow().desired.max_future_ts
    }

    fn limits(&self) -> Limits {
        let cfg = self.cfg();
        Limits {
            max_bytes: usize::try_from(cfg.max_document_bytes).unwrap_or(usize::MAX),
            max_depth: cfg.max_depth,
        }
    }

    /// Takes in a payload from `P/D/desired`. Returns once what must be durable is: the
    /// caller acknowledges the message (PUBACK) only after `Ok`. A document that cannot be
    /// read is answered with a `rejected` result and is `Ok` too (it is consumed, never
    /// redelivered forever).
    pub async fn receive(&self, payload: &[u8]) -> Result<(), StoreError> {
        match doc::decode(payload, self.limits()) {
            Err(e) => {
                tracing::warn!("desired document refused: {e}");
                let result = json!({"version": e.version, "status": "rejected", "error": e.reason, "keys": {}});
                dstore::queue(
                    &self.outbox,
                    "desired/result",
                    doc::encode(&result, e.encoding),
                )
                .await?;
                self.results.notify_one();
            }
            Ok(d) => {
                let version = d.version;
                let entry = InboxEntry {
                    version,
                    ts: d.ts,
                    state: d.state,
                    json: d.encoding == Encoding::Json,
                    received: now_ms(),
                    applying: false,
                };
                let stale = json!({"version": version, "status": "stale", "keys": {},
                    "error": "a newer or equal version was already taken in"});
                let stale = doc::encode(&stale, d.encoding);
                let received = dstore::receive(&self.outbox, entry, stale).await?;
                // Durable, the applier not yet woken, no PUBACK yet.
                crate::sys::crash::point("desired-taken");
                match received {
                    Received::Accepted => {
                        tracing::info!(version, "desired document taken in");
                        self.wake.notify_one();
                    }
                    Received::Stale { current } => {
                        tracing::info!(version, current, "stale desired document");
                        self.results.notify_one();
                    }
                    Received::Duplicate => {
                        tracing::info!(version, "duplicate desired document");
                        self.results.notify_one();
                    }
                }
            }
        }
        Ok(())
    }

    /// Applies documents as they come, until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        loop {
            if stop.is_cancelled() {
                return;
            }
            let outbox = self.outbox.clone();
            let pending = tokio::task::spawn_blocking(move || dstore::inbox(&outbox)).await;
            match pending {
                Ok(Ok(docs)) => {
                    for d in docs {
                        if stop.is_cancelled() {
                            return;
                        }
                        if let Err(e) = self.apply(d).await {
                            tracing::error!("applying desired state failed: {e}");
                            // Try again later rather than spin.
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
                Ok(Err(e)) => tracing::error!("reading desired documents failed: {e}"),
                Err(e) => tracing::error!("internal task failed: {e}"),
            }
            tokio::select! {
                () = self.wake.notified() => {}
                () = stop.cancelled() => {}
            }
        }
    }

    async fn apply(&self, d: InboxEntry) -> Result<(), StoreError> {
        let version = d.version;
        let statuses: Vec<(String, KeyStatus, Option<KeyUpdate>)> = if d.applying {
            tracing::warn!(
                version,
                "desired document was being applied when the agent stopped; its keys are reported failed, not run again"
            );
            d.state
                .iter()
                .map(|(k, _)| {
                    let why = "interrupted: the agent restarted while applying; not retried (at most once)";
                    (k.clone(), KeyStatus::Failed(why.into()), None)
                })
                .collect()
        } else {
            dstore::begin(&self.outbox, version).await?;
            self.run_keys(&d).await?
        };
        let status = document_status(statuses.iter().map(|(_, s, _)| s));
        let mut keys = Map::new();
        let mut updates = Vec::new();
        for (key, status, update) in statuses {
            keys.insert(key, status.entry());
            updates.extend(update);
        }
        let result = json!({"version": version, "status": status, "keys": keys});
        dstore::finish(
            &self.outbox,
            version,
            updates,
            result,
            d.encoding(),
            self.cfg().history,
        )
        .await?;
        tracing::info!(version, status, "desired document applied");
        self.results.notify_one();
        Ok(())
    }

    /// Plans every key, runs handlers concurrently, returns statuses in document order.
    async fn run_keys(
        &self,
        d: &InboxEntry,
    ) -> Result<Vec<(String, KeyStatus, Option<KeyUpdate>)>, StoreError> {
        let cfg = self.cfg();
        let slots = Arc::new(Semaphore::new(cfg.concurrency.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        let now = now_ms();
        if believed(&cfg, None, d.ts, d.received, now).1 != d.ts {
            tracing::warn!(version = d.version, ts = ?d.ts, received = d.received,
                "the document's ts is further ahead of its receipt than desired.max_future_ts: not believed in conflict checks");
        }
        for (i, (key, value)) in d.state.iter().enumerate() {
            let outbox = self.outbox.clone();
            let k = key.clone();
            let local = tokio::task::spawn_blocking(move || dstore::local_change(&outbox, &k))
                .await
                .map_err(|e| StoreError::Io(e.to_string()))??;
            if let Some(l) = &local
                && believed(&cfg, Some(l), None, 0, now)
                    .0
                    .is_some_and(|b| b.ts != l.ts)
            {
                tracing::warn!(key = %key, ts = l.ts, now,
                    "the device's last change of this key is stamped further ahead than desired.max_future_ts: its ts does not win a conflict");
            }
            let plan = plan_key(&cfg, key, value, local.as_ref(), d.ts, d.received, now);
            let this = self.clone();
            let key = key.clone();
            let slots = Arc::clone(&slots);
            let version = d.version;
            tasks.spawn(async move {
                let _slot = slots.acquire_owned().await;
                let status = this.execute(&key, plan, version, Origin::Cloud).await;
                (i, key, status)
            });
        }
        let mut out: Vec<Option<(String, KeyStatus, Option<KeyUpdate>)>> =
            vec![None; d.state.len()];
        while let Some(done) = tasks.join_next().await {
            let (i, key, (status, update)) = done.map_err(|e| StoreError::Io(e.to_string()))?;
            if let Some(slot) = out.get_mut(i) {
                *slot = Some((key, status, update));
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Carries out one key's plan.
    async fn execute(
        &self,
        key: &str,
        plan: KeyPlan,
        version: u64,
        origin: Origin,
    ) -> (KeyStatus, Option<KeyUpdate>) {
        let value = match plan {
            KeyPlan::Reject(e) => return (KeyStatus::Rejected(e), None),
            KeyPlan::KeepDevice => return (KeyStatus::Conflict, None),
            KeyPlan::Apply(v) => v,
            KeyPlan::Merge {
                device,
                cloud,
                argv,
                timeout,
            } => match handlers::run_merge(&argv, timeout, key, &device, &cloud).await {
                Ok(v) => v,
                Err(e) => return (KeyStatus::Failed(format!("merge: {e}")), None),
            },
        };
        match self.handle(key, &value, version).await {
            (Outcome::Applied(v), handled) => (
                if handled {
                    KeyStatus::Applied
                } else {
                    KeyStatus::Recorded
                },
                Some(KeyUpdate {
                    key: key.to_owned(),
                    value: v,
                    origin,
                }),
            ),
            (Outcome::Failed(e), _) => (KeyStatus::Failed(e), None),
        }
    }

    /// Runs the key's handler (first match), or only records the value; `true` when a
    /// handler ran.
    async fn handle(&self, key: &str, value: &Value, version: u64) -> (Outcome, bool) {
        let cfg = self.cfg();
        let handler = cfg.handlers.iter().find(|h| h.keys.matches(key));
        let outcome = match handler.map(|h| &h.kind) {
            None => return (Outcome::Applied(value.clone()), false),
            Some(HandlerKind::Exec { argv, timeout }) => {
                handlers::run_exec(argv, *timeout, key, value, version).await
            }
            Some(HandlerKind::File { path }) => handlers::run_file(path, key, value).await,
            Some(HandlerKind::Watch { deadline }) => {
                self.watchers.deliver(key, value, version, *deadline).await
            }
        };
        (outcome, true)
    }

    /// Applies the value `key` had at `version` again, through the same handler path;
    /// recorded in history with origin `rollback` and reported.
    pub async fn rollback(&self, key: &str, version: u64) -> Result<Value, RollbackError> {
        let outbox = self.outbox.clone();
        let k = key.to_owned();
        let history = tokio::task::spawn_blocking(move || dstore::history(&outbox, &k)).await??;
        let Some(entry) = history.iter().rev().find(|h| h.version == version) else {
            let mut known: Vec<u64> = history.iter().map(|h| h.version).collect();
            known.dedup();
            return Err(RollbackError::NoSuchVersion {
                key: key.to_owned(),
                version,
                known,
            });
        };
        let (status, update) = self
            .execute(
                key,
                KeyPlan::Apply(entry.value.clone()),
                version,
                Origin::Rollback,
            )
            .await;
        match (status, update) {
            (KeyStatus::Applied | KeyStatus::Recorded, Some(u)) => {
                let applied = u.value.clone();
                let history_len = self.cfg().history;
                self.outbox
                    .transact(move |ctx| dstore::apply_updates(ctx, version, &[u], history_len))
                    .await?;
                Ok(json!({"key": key, "version": version, "value": applied, "status": "applied"}))
            }
            (KeyStatus::Failed(e), _) | (KeyStatus::Rejected(e), _) => {
                Err(RollbackError::Handler(e))
            }
            _ => Err(RollbackError::NotApplied),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Issue 15: a document whose only key failed was `rejected`; SPEC §7 says `failed`.
    #[test]
    fn the_document_status_follows_its_keys() {
        let ok = KeyStatus::Applied;
        let rec = KeyStatus::Recorded;
        let fail = KeyStatus::Failed("exit 1".into());
        let rej = KeyStatus::Rejected("above the maximum".into());
        let conflict = KeyStatus::Conflict;
        for (keys, want) in [
            (&[][..], "applied"),
            (&[ok.clone(), rec.clone()][..], "applied"),
            (&[rec.clone()][..], "applied"),
            (&[fail.clone()][..], "failed"),
            (&[fail.clone(), fail.clone()][..], "failed"),
            (&[ok.clone(), fail.clone()][..], "partial"),
            (&[rec.clone(), rej.clone()][..], "partial"),
            (&[rej.clone()][..], "rejected"),
            (&[conflict.clone()][..], "rejected"),
            (&[fail.clone(), rej.clone()][..], "rejected"),
        ] {
            assert_eq!(document_status(keys), want, "{keys:?}");
        }
    }

    /// Takes in `payload` and applies whatever that put in the inbox; returns how many
    /// documents were applied.
    async fn receive_and_apply(a: &Applier, payload: &[u8]) -> usize {
        a.receive(payload).await.unwrap();
        let docs = dstore::inbox(&a.outbox).unwrap();
        let n = docs.len();
        for d in docs {
            a.apply(d).await.unwrap();
        }
        n
    }

    // Issue 21: a duplicate desired version applied again was caught only by an
    // integration test's timeout.
    #[tokio::test]
    async fn a_duplicate_or_stale_desired_version_is_never_applied_again() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = crate::store::test_outbox(dir.path());
        let config = Config::from_toml_str(
            std::path::Path::new("/test/edgesync.toml"),
            "[device]\nid = \"pump-0042\"\n\n[mqtt]\nurl = \"mqtt://localhost\"\nallow_plaintext = true\n",
        )
        .unwrap();
        let (_config, rx) = watch::channel(Arc::new(config));
        let a = Applier::new(outbox.clone(), rx, Watchers::default());
        let doc = |version: u64, k: u64| {
            serde_json::to_vec(&json!({"version": version, "state": {"k": k}})).unwrap()
        };
        // Twice before it is applied (a QoS 1 redelivery): taken in once.
        a.receive(&doc(2, 1)).await.unwrap();
        assert_eq!(receive_and_apply(&a, &doc(2, 1)).await, 1);
        // Again once applied, with another value; then an older version: neither applied.
        assert_eq!(receive_and_apply(&a, &doc(2, 5)).await, 0, "duplicate");
        assert_eq!(receive_and_apply(&a, &doc(1, 7)).await, 0, "stale");
        assert_eq!(dstore::applied_version(&outbox).unwrap(), Some(2));
        let history = dstore::history(&outbox, "k").unwrap();
        assert_eq!(
            history
                .iter()
                .map(|h| (h.version, h.value.clone()))
                .collect::<Vec<_>>(),
            vec![(2, json!(1))],
            "applied once, with the first value"
        );
        let statuses: Vec<(Value, Value)> = dstore::pending_results(&outbox)
            .unwrap()
            .iter()
            .map(|r| {
                let v: Value = serde_json::from_slice(&r.payload).unwrap();
                (v["version"].clone(), v["status"].clone())
            })
            .collect();
        assert_eq!(
            statuses,
            vec![
                (json!(2), json!("applied")),
                (json!(2), json!("duplicate")),
                (json!(1), json!("stale")),
            ]
        );
        outbox.shutdown().await;
    }

    // A key without a handler is only recorded: `applied`, marked `"handler": "none"`.
    #[test]
    fn a_key_without_a_handler_is_applied_and_says_it_was_only_recorded() {
        assert_eq!(KeyStatus::Applied.entry(), json!({"status": "applied"}));
        assert_eq!(
            KeyStatus::Recorded.entry(),
            json!({"status": "applied", "handler": "none"})
        );
        assert_eq!(
            KeyStatus::Failed("x".into()).entry(),
            json!({"status": "failed", "error": "x"})
        );
    }
}
