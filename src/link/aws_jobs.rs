//! The session driver's side of AWS IoT Jobs (`aws-iot` profile): publishes the `start-next`
//! requests [`super::jobs::Jobs`] asks for, hands the executions it takes to the intake
//! ([`command`]: to the controller, as `P/D/cmd/NAME` requests are), and counts what the Jobs
//! service answered. The answers themselves are results (the result outbox, published as
//! the job's update by the profile).

use std::time::Instant;

use rumqttc::AsyncClient;
use serde_json::Value;
use tokio::sync::mpsc;

use super::intake::IntakeToken;
use super::jobs::{self, JobMsg, Refused, Started};
use super::oversize::Filter;
use super::profile::Outbound;
use super::{Session, Tag};
use crate::control::request::BadRequest;

/// The command of the execution in a `start-next/accepted` message the session handed to
/// the intake: its name, its request or why there is none, and the reply topic. The session
/// read it already: `None` (unreadable) never comes.
pub(super) fn command(payload: &[u8]) -> Option<(String, Result<Vec<u8>, BadRequest>, String)> {
    let v: Value = serde_json::from_slice(payload).unwrap_or_default();
    let exec = jobs::execution(&v).ok()??;
    let reply = jobs::reply_topic(&exec.job_id, exec.version);
    Some(match jobs::command(&exec) {
        Ok((name, request)) => (name.to_owned(), Ok(request), reply),
        Err(message) => {
            let id = Some(exec.job_id);
            let message = message.to_owned();
            (String::new(), Err(BadRequest { id, message }), reply)
        }
    })
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or("?")
}

/// Figures counted: `[taken, succeeded, failed, retried, left, repeats_refused]`.
type Counts = [u64; 6];

impl Session<'_> {
    /// Adds to the jobs figures; `rejection` replaces the last one.
    #[inline(never)]
    fn job_count(&self, n: Counts, rejection: Option<String>) {
        self.board.update(|b| {
            let f = b.jobs.get_or_insert_with(Default::default);
            f.taken += n[0];
            f.succeeded += n[1];
            f.failed += n[2];
            f.retried += n[3];
            f.left += n[4];
            f.repeats_refused += n[5];
            if rejection.is_some() {
                f.last_rejection = rejection;
            }
        });
    }

    fn start_next(&mut self, client: &AsyncClient, body: Vec<u8>) -> Result<(), String> {
        let m = self
            .settings
            .profile
            .outbound(Outbound::Jobs { op: "start-next" }, body);
        self.publish(client, m, Tag::Jobs)
    }

    /// Connected: ask for the next job (also the one in progress, whose answer may be lost).
    #[inline(never)]
    pub(super) fn jobs_connected(&mut self, client: &AsyncClient) -> Result<(), String> {
        // Without the subscription (held after an oversize message) no answer would come.
        if !self.filters.contains(&Filter::Commands) {
            return Ok(());
        }
        let Some(j) = self.jobs.as_mut() else {
            return Ok(());
        };
        let ask = j.connected(Instant::now());
        // Shown (zeros) from the first connection on.
        self.job_count([0; 6], None);
        self.start_next(client, ask)
    }

    /// When the jobs need the loop (online only).
    pub(super) fn jobs_wake(&self) -> Option<Instant> {
        self.connected_at?;
        self.jobs.as_ref()?.wake_at()
    }

    /// A backoff ended or an answer is overdue.
    #[inline(never)]
    pub(super) fn jobs_tick(&mut self, client: &AsyncClient) -> Result<(), String> {
        let Some(j) = self.jobs.as_mut() else {
            return Ok(());
        };
        let Some((ask, lost)) = j.tick(Instant::now()) else {
            return Ok(());
        };
        // A lost exchange is counted, not logged.
        self.job_count([0, 0, 0, u64::from(lost), 0, 0], None);
        self.start_next(client, ask)
    }

    /// A result is being published: if it is a job's update, its answer is due.
    pub(super) fn job_published(&mut self, topic: &str) {
        if let Some(j) = self.jobs.as_mut() {
            j.published(topic, Instant::now());
        }
    }

    /// A message on a Jobs topic: acknowledged here, or (an execution to take in) by the
    /// intake once durable.
    #[inline(never)]
    pub(super) fn on_job(
        &mut self,
        client: &AsyncClient,
        intake: &mpsc::Sender<(rumqttc::Publish, IntakeToken)>,
        p: rumqttc::Publish,
        token: IntakeToken,
        job: &str,
        msg: JobMsg,
    ) -> Result<(), String> {
        let now = Instant::now();
        let Some(j) = self.jobs.as_mut() else {
            let _ = client.try_ack(&p);
            return Ok(());
        };
        let v: Value = serde_json::from_slice(&p.payload).unwrap_or_default();
        let mut ask = None;
        let mut n: Counts = [0; 6];
        // What to log (a warning when `warn`) and whether it is the last rejection.
        let mut note = None;
        let (mut warn, mut rejection) = (false, false);
        match msg {
            JobMsg::NotifyNext => ask = j.notify_next(&v, now),
            JobMsg::StartNextAccepted => match j.start_next_accepted(&v, now) {
                Started::Run(e) => {
                    tracing::info!(job = %e.job_id, version = e.version, "job execution taken");
                    self.job_count([1, 0, 0, 0, 0, 0], None);
                    // Acknowledged by the intake once the job is taken in; never full (see
                    // `Session::run`), else the broker sends it again.
                    if let Err(e) = intake.try_send((p, token)) {
                        tracing::error!("command intake did not take a job: {e}");
                    }
                    return Ok(());
                }
                Started::Left(id) => {
                    note = Some(format!(
                        "the next job, {id}, is one left after a final rejection: not answered \
                         again (cancel its execution to let the queue go on)"
                    ));
                }
                Started::Bad(why) => {
                    warn = true;
                    note = Some(format!(
                        "unreadable start-next answer ({why}): asking again later"
                    ));
                }
                Started::Nothing => {}
            },
            JobMsg::StartNextRejected => {
                if j.start_next_rejected(&v, now) {
                    n[3] = 1;
                    (warn, rejection) = (true, true);
                    note = Some(format!(
                        "start-next rejected {} {}",
                        str_of(&v["code"]),
                        str_of(&v["message"])
                    ));
                }
            }
            JobMsg::UpdateAccepted => {
                ask = j.update_accepted(job, now);
                if ask.is_some() {
                    let status = v["executionState"]["status"].as_str().unwrap_or("?");
                    n[1] = u64::from(status == "SUCCEEDED");
                    n[2] = u64::from(status == "FAILED");
                    note = Some(format!("job {job} answered: {status}"));
                }
            }
            JobMsg::UpdateRejected => {
                let code = v["code"].as_str().unwrap_or("unreadable");
                let (refused, a) = j.update_rejected(job, code, now);
                ask = a;
                let what = format!(
                    "job {job}: update rejected {code} {} (execution {})",
                    str_of(&v["message"]),
                    str_of(&v["executionState"]["status"])
                );
                let then = match refused {
                    Refused::Stale => {
                        n[5] = 1;
                        "a repeated answer of a job that had ended (counted in jobs.repeats_refused)"
                            .to_owned()
                    }
                    Refused::Left => {
                        n[4] = 1;
                        warn = true;
                        "the job is left, not answered again (counted in jobs.left)".to_owned()
                    }
                    Refused::Retry(d) => {
                        n[3] = 1;
                        format!("asking for it again in {d:.1?}")
                    }
                };
                rejection = true;
                note = Some(format!("{what}; {then}"));
            }
        }
        if let Some(what) = note {
            if warn {
                tracing::warn!("{what}");
            } else {
                tracing::info!("{what}");
            }
            self.job_count(n, rejection.then_some(what));
        }
        let _ = client.try_ack(&p);
        drop(token);
        match ask {
            Some(a) => self.start_next(client, a),
            None => Ok(()),
        }
    }
}
