//! The session driver's side of AWS IoT Jobs (`aws-iot` profile): publishes the `start-next`
//! requests [`super::jobs::Jobs`] asks for, hands the executions it takes to the intake
//! ([`take_in`]: the controller, as `P/D/cmd/NAME` requests are), and counts what the Jobs
//! service answered. The answers themselves are results (the result outbox, published as
//! the job's update by the profile).

use std::time::Instant;

use rumqttc::AsyncClient;
use tokio::sync::mpsc;

use super::intake::IntakeToken;
use super::jobs::{self, JobMsg, Refused, Started};
use super::oversize::Filter;
use super::profile::Outbound;
use super::{Session, Tag};
use crate::control::{Controller, ErrorCode};
use crate::health::status::JobFigures;
use crate::store::StoreError;

/// Takes in the execution of a `start-next/accepted` message the session handed over:
/// durable (or answered) when it returns, then the message is acknowledged.
pub(super) async fn take_in(controller: &Controller, payload: &[u8]) -> Result<(), StoreError> {
    // The session read it already: an unreadable one never gets here.
    let Ok(jobs::Answer {
        execution: Some(exec),
        ..
    }) = jobs::answer(payload)
    else {
        return Ok(());
    };
    let reply = jobs::reply_topic(&exec.job_id, exec.version);
    match jobs::command(&exec) {
        Ok((name, request)) => controller.receive_for(&name, &request, &reply).await,
        Err(message) => {
            controller
                .refuse(&reply, &exec.job_id, ErrorCode::BadRequest, &message)
                .await
        }
    }
}

/// What a Jobs message led to, acted on once the state machine is released.
enum Then {
    Nothing,
    Run,
    Accepted(Option<String>),
    Rejected(String, Refused),
    StartRejected(String),
}

impl Session<'_> {
    fn job_figures(&self, f: impl FnOnce(&mut JobFigures)) {
        self.board
            .update(|b| f(b.jobs.get_or_insert_with(Default::default)));
    }

    fn start_next(&mut self, client: &AsyncClient, body: Vec<u8>) -> Result<(), String> {
        let m = self
            .settings
            .profile
            .outbound(Outbound::Jobs { op: "start-next" }, body);
        self.publish(client, m, Tag::Jobs)
    }

    /// Connected: ask for the next job (also the one in progress, whose answer may be lost).
    pub(super) fn jobs_connected(&mut self, client: &AsyncClient) -> Result<(), String> {
        // Without the subscription (held after an oversize message) no answer would come.
        if self.jobs.is_none() || !self.filters.contains(&Filter::Commands) {
            return Ok(());
        }
        // Shown (zeros) from the first connection on.
        self.job_figures(|_| {});
        let Some(j) = self.jobs.as_mut() else {
            return Ok(());
        };
        let ask = j.connected(Instant::now());
        self.start_next(client, ask)
    }

    /// When the jobs need the loop (online only).
    pub(super) fn jobs_wake(&self) -> Option<Instant> {
        self.connected_at?;
        self.jobs.as_ref()?.wake_at()
    }

    /// A backoff ended or an answer is overdue.
    pub(super) fn jobs_tick(&mut self, client: &AsyncClient) -> Result<(), String> {
        let Some(j) = self.jobs.as_mut() else {
            return Ok(());
        };
        let Some((ask, lost)) = j.tick(Instant::now()) else {
            return Ok(());
        };
        if lost {
            tracing::debug!(
                "no answer from the Jobs service in time: asking for the next job again"
            );
            self.job_figures(|f| f.retried += 1);
        }
        self.start_next(client, ask)
    }

    /// A result is being published: if it is a job's update, its answer is due.
    pub(super) fn job_published(&mut self, topic: &str) {
        if let Some((job, version)) = jobs::parse_reply(topic)
            && let Some(j) = self.jobs.as_mut()
        {
            j.published(job, version, Instant::now());
        }
    }

    /// A message on a Jobs topic: acknowledged here, or (an execution to take in) by the
    /// intake once durable.
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
        let mut ask = None;
        let then = match msg {
            JobMsg::NotifyNext => {
                ask = j.notify_next(&p.payload, now);
                Then::Nothing
            }
            JobMsg::StartNextAccepted => match j.start_next_accepted(&p.payload, now) {
                Started::Run(e) => {
                    tracing::info!(job = %e.job_id, version = e.version, "job execution taken");
                    Then::Run
                }
                Started::Answering(id) => {
                    tracing::debug!(job = %id, "job next: its answer is on its way");
                    Then::Nothing
                }
                Started::Stale => {
                    tracing::debug!("start-next answer of an earlier request ignored");
                    Then::Nothing
                }
                Started::Empty => {
                    tracing::debug!("no job pending");
                    Then::Nothing
                }
                Started::Left(id) => {
                    tracing::info!(
                        job = %id,
                        "the next job is one left after a final rejection: not answered again \
                         (cancel its execution to let the queue go on)"
                    );
                    Then::Nothing
                }
                Started::Bad(e) => {
                    tracing::warn!("unreadable start-next answer ({e}): asking again later");
                    Then::Nothing
                }
            },
            JobMsg::StartNextRejected => match j.start_next_rejected(&p.payload, now) {
                Some(r) => {
                    Then::StartRejected(format!("start-next rejected {} {}", r.code, r.message))
                }
                None => Then::Nothing,
            },
            JobMsg::UpdateAccepted => {
                ask = j.update_accepted(job, now);
                let state: serde_json::Value =
                    serde_json::from_slice(&p.payload).unwrap_or_default();
                match ask {
                    Some(_) => Then::Accepted(
                        state["executionState"]["status"]
                            .as_str()
                            .map(str::to_owned),
                    ),
                    None => Then::Nothing,
                }
            }
            JobMsg::UpdateRejected => {
                let r = jobs::rejection(&p.payload);
                let (refused, a) = j.update_rejected(job, &r.code, now);
                ask = a;
                let mut what = format!("job {job}: update rejected {} {}", r.code, r.message);
                if let Some(s) = r.status {
                    what.push_str(&format!(" (execution {s})"));
                }
                Then::Rejected(what, refused)
            }
        };
        match then {
            Then::Run => {
                self.job_figures(|f| f.taken += 1);
                // Acknowledged by the intake once the job is taken in; never full (see
                // `Session::run`), else the broker sends it again.
                if let Err(e) = intake.try_send((p, token)) {
                    tracing::error!("command intake did not take a job: {e}");
                }
                return Ok(());
            }
            Then::Nothing => {}
            Then::Accepted(status) => {
                tracing::info!(
                    job,
                    status = status.as_deref().unwrap_or("?"),
                    "job answered"
                );
                match status.as_deref() {
                    Some("SUCCEEDED") => self.job_figures(|f| f.succeeded += 1),
                    Some("FAILED") => self.job_figures(|f| f.failed += 1),
                    _ => {}
                }
            }
            Then::StartRejected(what) => {
                tracing::warn!("{what}; asking again after a backoff");
                self.job_figures(|f| {
                    f.retried += 1;
                    f.last_rejection = Some(what);
                });
            }
            Then::Rejected(what, refused) => {
                match refused {
                    Refused::Stale => {
                        tracing::info!(
                            "{what}: a repeated answer of a job that had ended (counted in \
                             jobs.repeats_refused)"
                        );
                        self.job_figures(|f| f.repeats_refused += 1);
                    }
                    Refused::Left => {
                        tracing::warn!(
                            "{what}; the job is left, not answered again (counted in jobs.left)"
                        );
                        self.job_figures(|f| f.left += 1);
                    }
                    Refused::Retry(d) => {
                        tracing::info!("{what}; asking for it again in {d:.1?}");
                        self.job_figures(|f| f.retried += 1);
                    }
                }
                self.job_figures(|f| f.last_rejection = Some(what));
            }
        }
        let _ = client.try_ack(&p);
        drop(token);
        match ask {
            Some(a) => self.start_next(client, a),
            None => Ok(()),
        }
    }
}
