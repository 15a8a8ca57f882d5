//! The session driver's side of the cloud's state document: the Device Shadow (`aws-iot`
//! profile) and the device twin (`azure-iot-hub`), one flow in two dialects
//! ([`Dialect`]): publishes what [`super::shadow`] decides and routes the answers back to
//! it. Reads of the latest values run off the event path, one at a time; watermarks are
//! persisted after each accepted update. After every connect the document is read (AWS
//! `/get`, twin `GET`) so that desired state set while offline is not missed.

use std::time::Instant;

use rumqttc::AsyncClient;

use super::backoff::{Backoff, Jitter};
use super::intake::IntakeToken;
use super::iothub::HubMsg;
use super::profile::{Outbound, Profile, Publication, ShadowMsg};
use super::shadow::{self, Admit, Desired, Dialect, Rejected, Reporter};
use super::{Job, Session, Tag};
use crate::model::change::now_ms;
use crate::store::desired as dstore;
use crate::store::shadow as sstore;

/// The state documents of one connection.
pub(super) struct Shadows {
    dialect: Dialect,
    /// Dotted keys as nested objects (always, in the twin).
    nested: bool,
    reporters: Vec<Reporter>,
    /// Client tokens (request ids): unique per run (start time) and per request.
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
    /// Twin: the highest desired version handed to the pipeline on this connection (its
    /// record in the store follows once the intake took it).
    taken: Option<u64>,
    /// Twin: the GET in flight (its request id, when sent), or when to send it again.
    get: Option<(String, Instant)>,
    get_retry: Option<Instant>,
    get_backoff: Backoff,
}

impl Shadows {
    fn token(&mut self) -> String {
        self.tokens += 1;
        format!("es-{:x}-{}", self.token_base, self.tokens)
    }

    /// When a reporter (or the twin's GET) needs the loop: a retry or a timeout.
    pub(super) fn wake_at(&self) -> Option<Instant> {
        let get = self
            .get
            .as_ref()
            .map(|(_, t)| *t + shadow::RESPONSE_TIMEOUT);
        let r = self.reporters.iter().filter_map(Reporter::wake_at).min();
        [r, get, self.get_retry].into_iter().flatten().min()
    }
}

/// A message of the state document, in either dialect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum DocMsg {
    /// AWS: a message on a shadow topic.
    Shadow { shadow: String, msg: ShadowMsg },
    /// Twin: a desired patch (its topic's `$version`).
    DesiredPatch { version: Option<u64> },
    /// Twin: an answer `res/{status}/?$rid={rid}` (to the GET, a patch or a result).
    TwinResponse { status: u16, rid: String },
}

impl DocMsg {
    /// The twin's messages (`None`: methods and cloud-to-device messages, not ours).
    pub(super) fn of_hub(m: HubMsg<'_>) -> Option<DocMsg> {
        match m {
            HubMsg::DesiredPatch { version } => Some(DocMsg::DesiredPatch { version }),
            HubMsg::TwinResponse { status, rid, .. } => Some(DocMsg::TwinResponse {
                status,
                rid: rid.to_owned(),
            }),
            HubMsg::Method { .. } | HubMsg::CloudToDevice { .. } => None,
        }
    }
}

impl Session<'_> {
    /// The state documents of this connection, their watermarks from the store (`None` with
    /// the `edgesync` profile).
    #[inline(never)]
    pub(super) fn shadows(&self) -> Option<Shadows> {
        let s = &self.settings;
        let backoff = || Backoff::new(s.backoff_initial, s.backoff_max, s.backoff_reset);
        let (dialect, nested, reporters) = match &s.profile {
            Profile::AwsIot(aws) => {
                let mut reporters = Vec::new();
                for name in aws.shadows() {
                    let mark = sstore::watermark(self.outbox, name);
                    reporters.push(Reporter::new(name.to_owned(), mark, backoff()));
                }
                (Dialect::Shadow, aws.nested, reporters)
            }
            Profile::AzureIotHub(_) => {
                let mark = sstore::watermark(self.outbox, shadow::TWIN);
                (Dialect::Twin, true, vec![Reporter::twin(mark, backoff())])
            }
            Profile::Edgesync(_) => return None,
        };
        Some(Shadows {
            dialect,
            nested,
            reporters,
            token_base: now_ms(),
            tokens: 0,
            dirty: true,
            reading: false,
            jitter: Jitter::from_entropy(),
            last_delta: serde_json::Value::Null,
            start: 0,
            taken: None,
            get: None,
            get_retry: None,
            get_backoff: backoff(),
        })
    }

    /// Adds to the counters (`shadow`, or `twin`): `[accepted, retried, dropped_keys,
    /// deltas]`.
    #[inline(never)]
    fn count(&self, n: [u64; 4], rejection: Option<String>) {
        let twin = matches!(self.settings.profile, Profile::AzureIotHub(_));
        self.board.update(|b| {
            let f = if twin { &mut b.twin } else { &mut b.shadow };
            let f = f.get_or_insert_with(Default::default);
            f.accepted += n[0];
            f.retried += n[1];
            f.dropped_keys += n[2];
            f.deltas += n[3];
            if rejection.is_some() {
                f.last_rejection = rejection;
            }
        });
    }

    /// A request of the document as the profile publishes it.
    fn doc_request(&self, shadow: &str, op: &str, token: &str, body: Vec<u8>) -> Publication {
        let msg = match self.settings.profile {
            Profile::AzureIotHub(_) => Outbound::Twin { op, rid: token },
            _ => Outbound::Shadow { shadow, op },
        };
        self.settings.profile.outbound(msg, body)
    }

    /// Connected: read the document (desired state set while offline), then report.
    #[inline(never)]
    pub(super) fn shadow_connected(&mut self, client: &AsyncClient) -> Result<(), String> {
        if self.shadows.is_none() {
            return Ok(());
        }
        self.shadow_get(client)?;
        self.shadow_pump();
        Ok(())
    }

    /// Publishes a read of the main document.
    fn shadow_get(&mut self, client: &AsyncClient) -> Result<(), String> {
        let main = self
            .settings
            .profile
            .aws()
            .map_or("", |a| a.shadow.as_str());
        let Some(sh) = &mut self.shadows else {
            return Ok(());
        };
        let token = sh.token();
        let body = sh.dialect.get_body(&token);
        if sh.dialect == Dialect::Twin {
            sh.get = Some((token.clone(), Instant::now()));
            sh.get_retry = None;
        }
        let m = self.doc_request(main, "get", &token, body);
        self.publish(client, m, Tag::Shadow)
    }

    /// A read that cannot wait for the next connect (a twin patch past a missed one, an AWS
    /// delta of a partial object): not sent (the client's queue is full), the twin tries
    /// again after a backoff; AWS reads at the next connect.
    fn shadow_get_again(&mut self, client: &AsyncClient) {
        if self.shadow_get(client).is_err()
            && let Some(sh) = &mut self.shadows
            && sh.dialect == Dialect::Twin
        {
            sh.get = None;
            let d = sh.get_backoff.next_delay(sh.jitter.unit());
            sh.get_retry = Some(Instant::now() + d);
        }
    }

    /// Values changed (or an update ended): read them if a document can take an update.
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

    /// The latest values read: the next update of every document that can take one.
    #[inline(never)]
    pub(super) fn shadow_read(
        &mut self,
        client: &AsyncClient,
        latest: Result<std::collections::BTreeMap<String, crate::store::ReportedValue>, String>,
    ) -> Result<(), String> {
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
        let aws = self.settings.profile.aws();
        let mut out = Ok(());
        // Each key to its shadow's bucket (moved, not copied); the twin is one document.
        let mut buckets: Vec<Vec<_>> = vec![Vec::new(); sh.reporters.len()];
        for (key, r) in latest {
            let to = aws.map_or(shadow::TWIN, |a| a.shadow_of(&key));
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
            let Some(u) = sh.reporters[i].next(mine, sh.nested, &token, now) else {
                continue;
            };
            // More may be dirty than fit in one update.
            sh.dirty = true;
            for (key, why) in &u.dropped {
                match sh.dialect {
                    Dialect::Shadow => {
                        tracing::warn!("{key}: not reported to shadow {name:?}: {why}");
                    }
                    Dialect::Twin => tracing::warn!("{key}: not reported to the twin: {why}"),
                }
            }
            let d = u.dropped.len() as u64;
            if d > 0 {
                self.count([0, 0, d, 0], None);
            }
            match u.payload {
                Some(p) => {
                    let m = self.doc_request(&name, "update", &token, p);
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

    /// A retry is due or an update went unanswered; the twin's GET likewise.
    #[inline(never)]
    pub(super) fn shadow_tick(&mut self, client: &AsyncClient) {
        let now = Instant::now();
        let Some(sh) = &mut self.shadows else { return };
        let mut late = 0;
        for r in &mut sh.reporters {
            late += u64::from(r.tick(now));
        }
        let get_late = sh
            .get
            .as_ref()
            .is_some_and(|(_, t)| now >= *t + shadow::RESPONSE_TIMEOUT);
        let get_due = get_late || sh.get_retry.is_some_and(|t| now >= t);
        if late + u64::from(get_late) > 0 {
            self.count([0, late + u64::from(get_late), 0, 0], None);
        }
        if get_due {
            self.shadow_get_again(client);
        }
        self.shadow_changed();
    }

    /// A message of the state document: acknowledged here, or given back to go to the
    /// intake (a desired document made from a delta or a desired patch, acknowledged once
    /// durable).
    #[inline(never)]
    pub(super) fn on_shadow(
        &mut self,
        client: &AsyncClient,
        mut p: rumqttc::Publish,
        token: IntakeToken,
        msg: DocMsg,
    ) -> Option<(rumqttc::Publish, IntakeToken)> {
        let Some(sh) = &mut self.shadows else {
            let _ = client.try_ack(&p);
            return None;
        };
        let (dialect, nested) = (sh.dialect, sh.nested);
        // The twin's GET answered: the whole twin (200), or not (to ask again).
        let mut read = None;
        if let DocMsg::TwinResponse { status, rid } = &msg
            && sh.get.as_ref().is_some_and(|(g, _)| g == rid)
        {
            sh.get = None;
            read = Some(*status);
            if *status == 200 {
                sh.get_backoff.connection_ended(std::time::Duration::MAX);
            }
        }
        let desired = match (&msg, read) {
            (_, Some(200)) => Some(shadow::twin_desired(&p.payload, true, None)),
            (DocMsg::DesiredPatch { version }, _) => {
                Some(shadow::twin_desired(&p.payload, false, *version))
            }
            (
                DocMsg::Shadow {
                    msg: m @ (ShadowMsg::Delta | ShadowMsg::GetAccepted),
                    ..
                },
                _,
            ) => {
                let from_get = *m == ShadowMsg::GetAccepted;
                Some(shadow::desired(&p.payload, from_get, nested))
            }
            _ => None,
        };
        let from_get = read.is_some()
            || matches!(
                msg,
                DocMsg::Shadow {
                    msg: ShadowMsg::GetAccepted,
                    ..
                }
            );
        match (desired, msg) {
            (Some(Desired::Apply(mut doc)), _) => {
                let version = doc["version"].as_u64().unwrap_or(0);
                let stored = dstore::accepted_version(self.outbox).ok().flatten();
                let sh = self.shadows.as_mut()?;
                // The twin also counts what this connection handed on, not yet in the
                // store (its GET and a patch may bring the same version).
                let taken = if dialect == Dialect::Twin {
                    stored.max(sh.taken)
                } else {
                    stored
                };
                match shadow::admit(dialect, version, taken, from_get) {
                    // The shadow sends a delta again after updates while a key differs.
                    Admit::Apply
                        if dialect == Dialect::Twin
                            || !shadow::seen(&sh.last_delta, &doc["state"]) =>
                    {
                        if dialect == Dialect::Twin && from_get {
                            // Unreadable: every key goes again (applied twice, never missed).
                            let current = dstore::state(self.outbox, None).unwrap_or_default();
                            let current = current.into_iter().map(|(k, e)| (k, e.value)).collect();
                            shadow::reconcile(&mut doc, &current);
                        }
                        let sh = self.shadows.as_mut()?;
                        sh.taken = Some(version);
                        // The twin's desired state is the one held: nothing to apply (no
                        // result); a later version has a gap against the store, so this
                        // connection counts the version as taken.
                        let empty = doc["state"].as_object().is_some_and(|m| m.is_empty());
                        if dialect == Dialect::Twin && empty {
                            let _ = client.try_ack(&p);
                            return None;
                        }
                        sh.last_delta = doc["state"].clone();
                        self.count([0, 0, 0, 1], None);
                        p.payload = doc.to_string().into_bytes().into();
                        return Some((p, token));
                    }
                    Admit::Get => self.shadow_get_again(client),
                    Admit::Apply | Admit::Skip => {}
                }
            }
            (Some(Desired::Get), _) => self.shadow_get_again(client),
            (Some(Desired::Nothing), _) => {}
            // No shadow yet (404), or nothing else to do.
            (None, DocMsg::Shadow { shadow, msg }) => {
                if matches!(msg, ShadowMsg::UpdateAccepted | ShadowMsg::UpdateRejected) {
                    let (t, code, message) = shadow::response(&p.payload);
                    if let Some(t) = t {
                        let accepted = msg == ShadowMsg::UpdateAccepted;
                        let what = format!("shadow {shadow:?}: update rejected {code} {message}");
                        self.on_update_answer(&t, accepted, code, what);
                    }
                }
            }
            (None, DocMsg::TwinResponse { status, rid }) => {
                let message = shadow::twin_error(&p.payload);
                match read {
                    // The GET failed: again after a backoff (429 and 5xx pass; others too,
                    // as the desired state must be read).
                    Some(s) => self.on_get_failed(s, &message),
                    None => {
                        let what = format!("twin: reported patch rejected {status} {message}");
                        self.on_update_answer(&rid, status == 204, u64::from(status), what);
                    }
                }
            }
            (None, DocMsg::DesiredPatch { .. }) => {}
        }
        let _ = client.try_ack(&p);
        drop(token);
        None
    }

    fn on_get_failed(&mut self, status: u16, message: &str) {
        let Some(sh) = &mut self.shadows else { return };
        let d = sh.get_backoff.next_delay(sh.jitter.unit());
        sh.get_retry = Some(Instant::now() + d);
        let what = format!("twin: GET answered {status} {message}");
        tracing::warn!("{what}; reading the twin again in {d:.1?}");
        self.count([0, 1, 0, 0], Some(what));
    }

    /// An update answered: `accepted`, or rejected with `code` (`what` says so for the log).
    #[inline(never)]
    fn on_update_answer(&mut self, token: &str, accepted: bool, code: u64, what: String) {
        let Some(sh) = &mut self.shadows else { return };
        let unit = sh.jitter.unit();
        let reporter = sh.reporters.iter_mut().find(|r| r.owns(token));
        let counter = sh.dialect.what();
        let action: std::borrow::Cow<'static, str> = match reporter {
            _ if shadow::is_result_token(token) => {
                if accepted {
                    return;
                }
                "the apply result is lost".into()
            }
            None => return,
            Some(r) if accepted => {
                if let Some(mark) = r.accepted(token) {
                    let name = r.shadow.clone();
                    self.count([1, 0, 0, 0], None);
                    self.persist(name, mark);
                    self.shadow_changed();
                }
                return;
            }
            Some(r) => {
                let name = r.shadow.clone();
                match r.rejected(token, code, Instant::now(), unit) {
                    Rejected::Unknown => return,
                    // Counted, not logged: 409 and 429 pass.
                    Rejected::Retry(_) => {
                        self.count([0, 1, 0, 0], None);
                        "".into()
                    }
                    Rejected::Split => "sending its keys one at a time".into(),
                    Rejected::Dropped(mark) => {
                        self.count([0, 0, 1, 0], None);
                        self.persist(name, mark);
                        format!("the key is dropped (counted in {counter}.dropped_keys)").into()
                    }
                }
            }
        };
        if !action.is_empty() {
            tracing::warn!("{what}; {action}");
        }
        self.count([0; 4], Some(what));
        self.shadow_changed();
    }
}
