//! Commands over MQTT (docs/PROTOCOL.md §4, §5): `P/D/cmd/NAME` in, `P/D/cmd/NAME/result` out, with
//! exactly-once effects.
//!
//! # Life of a request
//! 1. **Intake** ([`Controller::receive`], called by the link before it sends the PUBACK).
//!    The payload is read ([`request`]); a malformed one, or one without a readable `id`, is
//!    answered `bad-request` at once (`"id": null` when no id could be read). Otherwise, in
//!    one store transaction ([`store::receive`]): an `id` already recorded is answered again
//!    from its stored first response (re-encoded in the new request's encoding) and not run;
//!    a request refused before running (`unknown-command`, `forbidden`, `expired`,
//!    `bad-request` for its arguments) is answered and not recorded; any other is recorded
//!    as *received*. Only then is the message acknowledged. An id taken in and not answered
//!    yet owes one more answer per encoding of its repeats (two flags, not one per repeat):
//!    a repeat in an encoding already owed is taken in with a read, no write.
//! 2. **Run** ([`Controller::run`]): every received request runs in its own task (a slow
//!    `sync` never holds up a `ping`; answers go out in any order). Before a command starts
//!    it is marked *started* ([`store::begin`]); when it ends, its response is stored and
//!    queued for publishing in one transaction ([`store::finish`]).
//! 3. **Publish**: responses wait in the store's result outbox (shared with desired-state
//!    results) until the broker acknowledged them. The link reads them incrementally (from
//!    the last one handed out, as many as its window of 32 has room for), one read at a time.
//!
//! Requests that come another way (an AWS IoT job, `crate::link::jobs`) go the same path
//! through [`Controller::receive`] with a `reply`: the job id is the `id`, the answer is
//! queued under the job's reply topic instead of `cmd/NAME/result`.
//!
//! # At most once across crashes
//! A request found *started* after a restart may have had its effect: it is answered
//! `failed` ("interrupted by a restart; not run again") and never run. One found only
//! *received* had not started: it runs (unless it expired meanwhile).
//!
//! # Replay window
//! Recorded ids are kept at least `[control] replay_window` after their receipt and at most
//! `replay_max` of them; the oldest answered ones are pruned when a new one is recorded. The
//! window counts the agent's running time ([`store::AgentClock`]), not the wall clock: a
//! clock set forward by days does not clear the record.

pub mod config;
pub mod desired_reset;
pub mod history;
pub mod log_level;
pub mod ping;
pub mod purge;
pub mod reload;
pub mod request;
pub mod rollback;
pub mod status;
pub mod store;
pub mod sync;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Encoding;
use crate::desired::apply::Applier;
use crate::health::status::{Identity, StatusBoard};
use crate::model::change::now_ms;
use crate::model::doc;
use crate::store::desired as dstore;
use crate::store::{Outbox, StoreError};

pub use crate::config::control::ControlConfig;
pub use crate::model::command::CommandName;
use crate::sys::log::LogControl;
pub use request::ErrorCode;

/// A parsed command with its arguments.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Ping,
    Status,
    Sync(sync::SyncQueue),
    History(history::History),
    Rollback(rollback::Rollback),
    LogLevel(log_level::LogLevel),
    Config,
    Reload,
    Purge(purge::Purge),
    DesiredReset(desired_reset::DesiredReset),
}

impl Command {
    /// Checks the arguments of `name`; `Err` is the message of a `bad-request`.
    pub fn parse(name: CommandName, args: Map<String, Value>) -> Result<Command, String> {
        let mut args = request::Args::new(name, args);
        let command = match name {
            CommandName::Ping => Command::Ping,
            CommandName::Status => Command::Status,
            CommandName::Sync => Command::Sync(sync::SyncQueue::parse(&mut args)?),
            CommandName::History => Command::History(history::History::parse(&mut args)?),
            CommandName::Rollback => Command::Rollback(rollback::Rollback::parse(&mut args)?),
            CommandName::LogLevel => Command::LogLevel(log_level::LogLevel::parse(&mut args)?),
            CommandName::Config => Command::Config,
            CommandName::Reload => Command::Reload,
            CommandName::Purge => Command::Purge(purge::Purge::parse(&mut args)?),
            CommandName::DesiredReset => {
                Command::DesiredReset(desired_reset::DesiredReset::parse(&mut args)?)
            }
        };
        args.finish()?;
        Ok(command)
    }

    /// Runs the command: `Ok(result)` or `Err(why it failed)`.
    pub async fn run(&self, svc: &Services, stop: CancellationToken) -> Result<Value, String> {
        match self {
            Command::Ping => Ok(ping::run()),
            Command::Status => status::run(svc).await,
            Command::Sync(c) => Ok(c.run(svc, stop).await),
            Command::History(c) => c.run(svc).await,
            Command::Rollback(c) => c.run(svc).await,
            Command::LogLevel(c) => c.run(svc),
            Command::Config => Ok(config::run(svc)),
            Command::Reload => reload::run(svc),
            Command::Purge(c) => c.run(svc).await,
            Command::DesiredReset(c) => c.run(svc).await,
        }
    }
}

/// What commands act on; cheap to clone.
#[derive(Debug, Clone)]
pub struct Services {
    pub outbox: Outbox,
    pub applier: Applier,
    pub board: StatusBoard,
    pub identity: Arc<Identity>,
    /// The running config (changes on reload).
    pub live: crate::reload::Live,
    /// The running log filter, when the process has one to change (`log-level`).
    pub log: Option<Arc<LogControl>>,
}

/// Takes in and runs commands; cheap to clone.
#[derive(Debug, Clone)]
pub struct Controller {
    svc: Services,
    /// New requests recorded.
    wake: Arc<Notify>,
    /// New responses to publish (the link listens; shared with desired-state results).
    results: Arc<Notify>,
    /// Set once a retained request was ignored (logged once at WARN, later ones at DEBUG).
    retained_logged: Arc<AtomicBool>,
    /// What the replay window counts in (not the wall clock).
    clock: store::AgentClock,
}

impl Controller {
    /// `results` is the link's signal for new entries in the result outbox
    /// ([`Applier::results`]).
    pub fn new(svc: Services, results: Arc<Notify>) -> Self {
        let clock = store::AgentClock::open(&svc.outbox).unwrap_or_else(|e| {
            // Counted from 0: ids of this run are kept; older ones go by the count only
            // until this run's clock passes the window.
            tracing::error!("reading the replay clock failed: {e}");
            store::AgentClock::starting_at(0)
        });
        Self {
            svc,
            wake: Arc::new(Notify::new()),
            results,
            retained_logged: Arc::new(AtomicBool::new(false)),
            clock,
        }
    }

    fn cfg(&self) -> ControlConfig {
        self.svc.live.current().control.clone()
    }

    /// Takes in a request for command `name`: from `P/D/cmd/NAME`, or another way (an AWS
    /// IoT job: `Err` when there is none, answered `bad-request`; its one answer queued under
    /// `reply` in the result outbox, not `cmd/NAME/result`). Returns once what must be
    /// durable is: the caller acknowledges the message (PUBACK) only after `Ok`. Every
    /// request is consumed: those refused are answered, never left to be redelivered forever.
    ///
    /// A retained message (`retain`: the broker sent it because of a new subscription) is
    /// ignored, counted and not answered (docs/PROTOCOL.md §7): the broker would send it again on every
    /// subscription, and it would run again once its id left the replay record.
    pub async fn receive(
        &self,
        name: &str,
        request: Result<&[u8], &request::BadRequest>,
        retain: bool,
        reply: Option<&str>,
    ) -> Result<(), StoreError> {
        if retain {
            self.svc
                .board
                .update(|b| b.retained_commands = b.retained_commands.saturating_add(1));
            if self.retained_logged.swap(true, Ordering::Relaxed) {
                tracing::debug!(command = name, "ignored a retained command request");
            } else {
                tracing::warn!(
                    command = name,
                    "retained message on a command topic ignored, not run (counted in status \
                     counters.retained_commands; later ones are not logged): the back end must \
                     publish commands without the retain flag, and clear this one by publishing \
                     an empty retained message on the topic"
                );
            }
            return Ok(());
        }
        let now = now_ms();
        // A refusal made by the caller is answered in JSON.
        let payload = request.unwrap_or(b"{}");
        let encoding = doc::sniff(payload);
        let topic = reply.map_or_else(|| result_topic(name), str::to_owned);
        let parsed;
        let req = match request.map(|p| request::parse(p, encoding)) {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(bad)) => {
                parsed = bad;
                Err(&parsed)
            }
            Err(bad) => Err(bad),
        };
        let req = match req {
            Ok(r) => r,
            Err(bad) => {
                tracing::warn!(command = name, id = ?bad.id, "command refused: {}", bad.message);
                let response =
                    request::error(bad.id.as_deref(), ErrorCode::BadRequest, &bad.message);
                // Text garbage is answered in JSON, which its sender can read.
                let answer = doc::answer_encoding(payload);
                dstore::queue(&self.svc.outbox, &topic, doc::encode(&response, answer)).await?;
                self.results.notify_one();
                return Ok(());
            }
        };
        tracing::debug!(command = name, id = %req.id, "command received");
        if reply.is_none() && self.repeat_owed(name, &req.id, encoding).await? {
            tracing::debug!(command = name, id = %req.id, "command id repeated while it runs: its answer follows");
            return Ok(());
        }
        let refusal = self
            .check(name, &req, now)
            .err()
            .map(|(code, message)| (code, request::error(Some(&req.id), code, &message)));
        let incoming = store::Incoming {
            id: req.id.clone(),
            name: name.to_owned(),
            json: encoding == Encoding::Json,
            args: req.args,
            expires: req.expires,
            refusal,
        };
        let limits = store::Limits::new(&self.cfg(), self.clock.now());
        let reply = reply.map(str::to_owned);
        let outcome = store::receive_to(&self.svc.outbox, incoming, reply, limits, now).await?;
        // Recorded, not yet run, no PUBACK yet.
        crate::sys::crash::point("command-taken");
        let id = req.id;
        match outcome {
            store::Intake::Accepted => self.wake.notify_one(),
            store::Intake::Refused(code) => {
                tracing::warn!(command = name, %id, code = code.as_str(), "command refused");
                self.results.notify_one();
            }
            store::Intake::Replayed => {
                tracing::info!(command = name, %id, "command id seen before: answered from the record, not run again");
                self.results.notify_one();
            }
            store::Intake::Conflict { first } => {
                tracing::warn!(command = name, %id, first, "command id already used by another command");
                self.results.notify_one();
            }
            store::Intake::InProgress => {
                tracing::info!(command = name, %id, "command id already taken in and not finished: its answer follows once");
            }
        }
        Ok(())
    }

    /// A repeat of an id that runs and already owes an answer in this encoding (see
    /// [`store::repeat_owed`]).
    async fn repeat_owed(
        &self,
        name: &str,
        id: &str,
        encoding: Encoding,
    ) -> Result<bool, StoreError> {
        let (outbox, name, id) = (self.svc.outbox.clone(), name.to_owned(), id.to_owned());
        let json = encoding == Encoding::Json;
        tokio::task::spawn_blocking(move || store::repeat_owed(&outbox, &id, &name, json))
            .await
            .unwrap_or(Ok(false))
    }

    /// Why a readable request is not run, as its error code and message.
    fn check(
        &self,
        name: &str,
        req: &request::Request,
        now: u64,
    ) -> Result<Command, (ErrorCode, String)> {
        let Some(command) = CommandName::parse(name) else {
            return Err((
                ErrorCode::UnknownCommand,
                format!(
                    "unknown command {name:?}; this agent knows {}",
                    CommandName::names().join(", ")
                ),
            ));
        };
        if !self.cfg().allow.contains(&command) {
            let why = if command.destructive() {
                "it is destructive and [control] allow does not list it"
            } else {
                "[control] allow does not list it"
            };
            return Err((
                ErrorCode::Forbidden,
                format!("command {name} is not enabled on this device: {why}"),
            ));
        }
        if let Some(message) = expired(req.expires, now) {
            return Err((ErrorCode::Expired, message));
        }
        Command::parse(command, req.args.clone()).map_err(|e| (ErrorCode::BadRequest, e))
    }

    /// Runs recorded requests as they come, each in its own task, until `stop`; then waits
    /// for those running (they see `stop` too: `sync` answers at once).
    pub async fn run(self, stop: CancellationToken) {
        let mut running: HashSet<String> = HashSet::new();
        let mut tasks: JoinSet<(String, Result<(), StoreError>)> = JoinSet::new();
        loop {
            if stop.is_cancelled() {
                break;
            }
            let outbox = self.svc.outbox.clone();
            match tokio::task::spawn_blocking(move || store::pending(&outbox)).await {
                Ok(Ok(pending)) => {
                    for entry in pending {
                        if running.insert(entry.id.clone()) {
                            let this = self.clone();
                            let stop = stop.clone();
                            tasks.spawn(async move {
                                let id = entry.id.clone();
                                (id, this.execute(entry, stop).await)
                            });
                        }
                    }
                }
                Ok(Err(e)) => tracing::error!("reading pending commands failed: {e}"),
                Err(e) => tracing::error!("internal task failed: {e}"),
            }
            tokio::select! {
                () = self.wake.notified() => {}
                () = stop.cancelled() => {}
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    if self.reap(done, &mut running) {
                        // Try again later rather than spin on a failing store.
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
        while let Some(done) = tasks.join_next().await {
            self.reap(done, &mut running);
        }
    }

    /// Forgets a finished task; `true` if it failed on the store.
    fn reap(
        &self,
        done: Result<(String, Result<(), StoreError>), tokio::task::JoinError>,
        running: &mut HashSet<String>,
    ) -> bool {
        match done {
            Ok((id, Ok(()))) => {
                running.remove(&id);
                false
            }
            Ok((id, Err(e))) => {
                tracing::error!(%id, "recording a command failed: {e}");
                running.remove(&id);
                true
            }
            Err(e) => {
                // A panicking command: its entry stays "started" and is answered
                // "interrupted" at the next start; never run twice.
                tracing::error!("command task failed: {e}");
                true
            }
        }
    }

    /// Carries out one recorded request (see the module docs).
    async fn execute(
        &self,
        entry: store::Entry,
        stop: CancellationToken,
    ) -> Result<(), StoreError> {
        let id = entry.id.clone();
        let name = entry.name.clone();
        let response = if entry.state == store::State::Started {
            tracing::warn!(command = %name, %id, "command was running when the agent stopped; answered failed, not run again");
            request::error(
                Some(&id),
                ErrorCode::Failed,
                "interrupted by a restart; not run again",
            )
        } else if let Some(message) = expired(entry.expires, now_ms()) {
            request::error(Some(&id), ErrorCode::Expired, &message)
        } else {
            let parsed = CommandName::parse(&name)
                .ok_or_else(|| format!("unknown command {name:?}"))
                .and_then(|c| Command::parse(c, entry.args.clone()));
            match parsed {
                Err(e) => request::error(Some(&id), ErrorCode::Failed, &e),
                Ok(command) => {
                    if !store::begin(&self.svc.outbox, &id).await? {
                        // Not "received" any more: nothing to do.
                        return Ok(());
                    }
                    tracing::info!(command = %name, %id, "running command");
                    match command.run(&self.svc, stop).await {
                        Ok(result) => request::ok(&id, result),
                        Err(e) => {
                            tracing::warn!(command = %name, %id, "command failed: {e}");
                            request::error(Some(&id), ErrorCode::Failed, &e)
                        }
                    }
                }
            }
        };
        let response = request::bounded(response, &id);
        store::finish(&self.svc.outbox, &id, response, now_ms()).await?;
        // Answered and queued, not yet published.
        crate::sys::crash::point("command-answered");
        tracing::debug!(command = %name, %id, "command answered");
        self.results.notify_one();
        Ok(())
    }
}

/// `cmd/NAME/result`, under `P/D/`.
pub fn result_topic(name: &str) -> String {
    format!("cmd/{name}/result")
}

/// The message of an `expired` answer when `expires` has passed.
fn expired(expires: Option<u64>, now: u64) -> Option<String> {
    expires.filter(|&e| now > e).map(|e| {
        format!(
            "the request expired {} ago (expires {e}, now {now}); not run",
            crate::model::text::human_duration(now - e)
        )
    })
}
