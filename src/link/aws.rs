//! The session driver's side of the Device Shadow (`aws-iot` profile): publishes what
//! [`super::shadow`] decides and routes the shadow's answers back to it. Reads of the latest
//! values run off the event path, one at a time; watermarks are persisted after each
//! accepted update.

use std::time::Instant;

use rumqttc::AsyncClient;

use super::backoff::{Backoff, Jitter};
use super::intake::IntakeToken;
use super::profile::{Outbound, ShadowMsg};
use super::shadow::{self, Desired, Rejected, Reporter};
use super::{Job, Session, Tag};
use crate::model::change::now_ms;
use crate::store::desired as dstore;
use crate::store::shadow as sstore;

/// The shadows of one connection.
pub(super) struct Shadows {
    reporters: Vec<Reporter>,
    /// Client tokens: unique per run (start time) and per request.
    token_base: u64,
    tokens: u64,
    /// Values may have changed since the last read.
    dirty: bool,
    reading: bool,
    jitter: Jitter,
    /// The state of the last delta handed to the pipeline on this connection.
    last_delta: serde_json::Value,
    /// The shadow whose turn is first at the next read (fair under the in-flight cap).
    start: usize,
}

impl Shadows {
    fn token(&mut self) -> String {
        self.tokens += 1;
        format!("es-{:x}-{}", self.token_base, self.tokens)
    }

    /// When a reporter needs the loop: a retry or a timeout.
    pub(super) fn wake_at(&self) -> Option<Instant> {
        self.reporters.iter().filter_map(Reporter::wake_at).min()
    }
}

impl Session<'_> {
    /// The shadows of this connection, their watermarks from the store (`None` with the
    /// `edgesync` profile).
    #[inline(never)]
    pub(super) fn shadows(&self) -> Option<Shadows> {
        let aws = self.settings.profile.aws()?;
        let s = &self.settings;
        let mut reporters = Vec::new();
        for name in aws.shadows() {
            let b = Backoff::new(s.backoff_initial, s.backoff_max, s.backoff_reset);
            let mark = sstore::watermark(self.outbox, name);
            reporters.push(Reporter::new(name.to_owned(), mark, b));
        }
        Some(Shadows {
            reporters,
            token_base: now_ms(),
            tokens: 0,
            dirty: true,
            reading: false,
            jitter: Jitter::from_entropy(),
            last_delta: serde_json::Value::Null,
            start: 0,
        })
    }

    /// Adds to the counters: `[accepted, retried, dropped_keys, deltas]`.
    #[inline(never)]
    fn count(&self, n: [u64; 4], rejection: Option<String>) {
        self.board.update(|b| {
            let f = b.shadow.get_or_insert_with(Default::default);
            f.accepted += n[0];
            f.retried += n[1];
            f.dropped_keys += n[2];
            f.deltas += n[3];
            if rejection.is_some() {
                f.last_rejection = rejection;
            }
        });
    }

    /// Connected: ask for the shadow (deltas sent while offline), then report.
    #[inline(never)]
    pub(super) fn shadow_connected(&mut self, client: &AsyncClient) -> Result<(), String> {
        let Some(sh) = &mut self.shadows else {
            return Ok(());
        };
        let token = sh.token();
        self.shadow_get(client, token)?;
        self.shadow_pump();
        Ok(())
    }

    fn shadow_get(&mut self, client: &AsyncClient, token: String) -> Result<(), String> {
        let Some(aws) = self.settings.profile.aws() else {
            return Ok(());
        };
        let body = format!(r#"{{"clientToken":"{token}"}}"#).into_bytes();
        let m = self.settings.profile.outbound(
            Outbound::Shadow {
                shadow: &aws.shadow,
                op: "get",
            },
            body,
        );
        self.publish(client, m, Tag::Shadow)
    }

    /// Values changed (or an update ended): read them if a shadow can take an update.
    pub(super) fn shadow_changed(&mut self) {
        if let Some(sh) = &mut self.shadows {
            sh.dirty = true;
        }
        self.shadow_pump();
    }

    fn shadow_pump(&mut self) {
        let now = Instant::now();
        let Some(sh) = &mut self.shadows else { return };
        if self.connected_at.is_none() || sh.reading || !sh.dirty {
            return;
        }
        if !sh.reporters.iter().any(|r| r.ready(now)) || !shadow::room(&sh.reporters) {
            return;
        }
        sh.reading = true;
        sh.dirty = false;
        self.spawn_job(Job::Latest);
    }

    /// The latest values read: the next update of every shadow that can take one.
    #[inline(never)]
    pub(super) fn shadow_read(
        &mut self,
        client: &AsyncClient,
        latest: Result<std::collections::BTreeMap<String, crate::store::ReportedValue>, String>,
    ) -> Result<(), String> {
        let Some(aws) = self.settings.profile.aws() else {
            return Ok(());
        };
        let Some(mut sh) = self.shadows.take() else {
            return Ok(());
        };
        sh.reading = false;
        let latest = match latest {
            Ok(l) => l,
            Err(e) => {
                // Read again at the next change or answer.
                sh.dirty = true;
                self.shadows = Some(sh);
                self.store_failed(&format!("reading the latest values failed: {e}"));
                return Ok(());
            }
        };
        let now = Instant::now();
        let mut out = Ok(());
        // Each key to its shadow's bucket (moved, not copied).
        let mut buckets: Vec<Vec<_>> = vec![Vec::new(); sh.reporters.len()];
        for (key, r) in latest {
            let to = aws.shadow_of(&key);
            if let Some(i) = sh.reporters.iter().position(|r| r.shadow == to) {
                buckets[i].push((key, r.seq, r.value));
            }
        }
        // Each shadow in turn, while the thing has room for one more update in flight (an
        // answer frees it and reads again).
        let (n, start) = (buckets.len(), sh.start);
        for i in (0..n).map(|j| (start + j) % n) {
            if self.connected_at.is_none() || !shadow::room(&sh.reporters) {
                break;
            }
            if !sh.reporters[i].ready(now) {
                continue;
            }
            let mine = std::mem::take(&mut buckets[i]);
            let name = sh.reporters[i].shadow.clone();
            let token = sh.token();
            let Some(u) = sh.reporters[i].next(mine, aws.nested, &token, now) else {
                continue;
            };
            // More may be dirty than fit in one update.
            sh.dirty = true;
            for (key, why) in &u.dropped {
                tracing::warn!("{key}: not reported to shadow {name:?}: {why}");
            }
            let n = u.dropped.len() as u64;
            if n > 0 {
                self.count([0, 0, n, 0], None);
            }
            match u.payload {
                Some(p) => {
                    let m = self.settings.profile.outbound(
                        Outbound::Shadow {
                            shadow: &name,
                            op: "update",
                        },
                        p,
                    );
                    if let Err(e) = self.publish(client, m, Tag::Shadow) {
                        out = Err(e);
                        break;
                    }
                }
                None => self.persist(name, u.top),
            }
        }
        sh.start = (start + 1) % n.max(1);
        self.shadows = Some(sh);
        out
    }

    fn persist(&self, shadow: String, seq: u64) {
        // Not queued (the store is busy): those values only go to the shadow once more.
        let _ = sstore::advance(self.outbox, shadow, seq);
    }

    /// A retry is due or an update went unanswered.
    #[inline(never)]
    pub(super) fn shadow_tick(&mut self) {
        let now = Instant::now();
        let Some(sh) = &mut self.shadows else { return };
        let mut late = 0;
        for r in &mut sh.reporters {
            late += u64::from(r.tick(now));
        }
        if late > 0 {
            self.count([0, late, 0, 0], None);
        }
        self.shadow_changed();
    }

    /// A message on a shadow topic: acknowledged here, or given back to go to the intake (a
    /// desired document made from a delta, acknowledged once durable).
    #[inline(never)]
    pub(super) fn on_shadow(
        &mut self,
        client: &AsyncClient,
        mut p: rumqttc::Publish,
        token: IntakeToken,
        shadow: &str,
        msg: ShadowMsg,
    ) -> Option<(rumqttc::Publish, IntakeToken)> {
        let nested = self.settings.profile.aws().is_some_and(|a| a.nested);
        let from_get = msg == ShadowMsg::GetAccepted;
        match msg {
            ShadowMsg::Delta | ShadowMsg::GetAccepted => {
                match shadow::desired(&p.payload, from_get, nested) {
                    Desired::Apply(doc) => {
                        // Shadow versions grow with every update: a delta at or below the
                        // version taken in is one seen already (the pipeline would answer
                        // `duplicate`), and so is the same delta again under a newer version.
                        let version = doc["version"].as_u64().unwrap_or(0);
                        let taken = dstore::accepted_version(self.outbox).ok().flatten();
                        let sh = self.shadows.as_mut()?;
                        if taken.is_none_or(|t| version > t)
                            && !shadow::seen(&sh.last_delta, &doc["state"])
                        {
                            sh.last_delta = doc["state"].clone();
                            self.count([0, 0, 0, 1], None);
                            p.payload = doc.to_string().into_bytes().into();
                            return Some((p, token));
                        }
                    }
                    Desired::Get => {
                        let t = self.shadows.as_mut()?.token();
                        // Not sent (the client's queue is full): the next connect reads it.
                        let _ = self.shadow_get(client, t);
                    }
                    Desired::Nothing => {}
                }
            }
            // No shadow yet (404), or nothing else to do.
            ShadowMsg::GetRejected => {}
            ShadowMsg::UpdateAccepted | ShadowMsg::UpdateRejected => {
                self.on_update_answer(shadow, msg == ShadowMsg::UpdateAccepted, &p.payload);
            }
        }
        let _ = client.try_ack(&p);
        drop(token);
        None
    }

    #[inline(never)]
    fn on_update_answer(&mut self, shadow: &str, accepted: bool, payload: &[u8]) {
        let (token, code, message) = shadow::response(payload);
        let Some(sh) = &mut self.shadows else { return };
        let Some(token) = token else { return };
        let unit = sh.jitter.unit();
        let reporter = sh.reporters.iter_mut().find(|r| r.shadow == shadow);
        let what = format!("shadow {shadow:?}: update rejected {code} {message}");
        let action = match reporter {
            _ if token == "edgesync-result" => {
                if accepted {
                    return;
                }
                "the apply result is lost"
            }
            None => return,
            Some(r) if accepted => {
                if let Some(mark) = r.accepted(&token) {
                    self.count([1, 0, 0, 0], None);
                    self.persist(shadow.to_owned(), mark);
                    self.shadow_changed();
                }
                return;
            }
            Some(r) => match r.rejected(&token, code, Instant::now(), unit) {
                Rejected::Unknown => return,
                // Counted, not logged: 409 and 429 pass.
                Rejected::Retry(_) => {
                    self.count([0, 1, 0, 0], None);
                    ""
                }
                Rejected::Split => "sending its keys one at a time",
                Rejected::Dropped(mark) => {
                    self.count([0, 0, 1, 0], None);
                    self.persist(shadow.to_owned(), mark);
                    "the key is dropped (counted in shadow.dropped_keys)"
                }
            },
        };
        if !action.is_empty() {
            tracing::warn!("{what}; {action}");
        }
        self.count([0; 4], Some(what));
        self.shadow_changed();
    }
}
