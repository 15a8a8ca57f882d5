//! Commands as AWS IoT Jobs (`aws-iot` profile, docs/PROTOCOL.md §7.3): the job document
//! `{"command": NAME, "args": {...}}` of an execution runs the command set of §5.6 (the same
//! checks, `[control] allow` and replay record as `P/D/cmd/NAME`), its answer goes back as
//! the execution's status. Decisions only, no I/O: parsing the service's messages, building
//! the update, and [`Jobs`], the state machine of one device's queue; the session drives it
//! (`super::aws_jobs`).
//!
//! Sources (AWS IoT developer guide and API reference):
//! - Jobs device MQTT API, topics and payloads:
//!   <https://docs.aws.amazon.com/iot/latest/developerguide/jobs-mqtt-api.html>
//! - `notify-next`: <https://docs.aws.amazon.com/iot/latest/developerguide/jobs-comm-notifications.html>
//! - error codes (`VersionMismatch`, `InvalidStateTransition`, `TerminalStateReached`, ...):
//!   <https://docs.aws.amazon.com/iot/latest/developerguide/jobs-api.html>
//! - `statusDetails`: keys 1-128 characters of `[a-zA-Z0-9:_-]`, values 1-1,024 characters
//!   of `[^\p{C}]`:
//!   <https://docs.aws.amazon.com/iot/latest/apireference/API_iot-jobs-data_JobExecutionState.html>
//!
//! # One job at a time
//! On every connect, on a `notify-next` while idle, and after each answered job the agent
//! publishes `start-next` (with a `clientToken` unique to this run: an answer to another
//! run's request, redelivered by the broker, is ignored). AWS returns the IN_PROGRESS
//! execution first, else the oldest QUEUED one (moving it to IN_PROGRESS): jobs run in queue
//! order, and a job whose answer never landed comes back. Its answer (or the recorded one of
//! a job taken in before) is published as `jobs/JOBID/update` with `expectedVersion` = the
//! execution's `versionNumber`; `/update/accepted` ends the job, then the next `start-next`.
//!
//! # Exactly once
//! The job id is the command's id in the replay record (`crate::control::store`): taken in
//! durably before the `start-next/accepted` message is acknowledged, run once, answered
//! from the record when the job comes back (after a kill -9 or a reconnect), for
//! `[control] replay_window` / `replay_max`. The answer waits in the result outbox (topic
//! [`reply_topic`]) until the broker acknowledged the update, also across restarts.
//!
//! # Rejections of an update
//! `VersionMismatch`, `InvalidStateTransition`, `TerminalStateReached`, `ResourceNotFound`,
//! `InvalidRequest`, `InvalidJson`: final; logged once, the job is left (not answered again
//! while this agent runs; [`LEFT_MAX`] remembered) and the next one asked for. Any other
//! code (`RequestThrottled`, `InternalError`, `ServiceUnavailable`, ...): `start-next` again
//! after a backoff (1 s doubling to 60 s), which returns the same job, answered again from
//! the record; after [`ATTEMPTS_MAX`] such rejections of one job it is left too.

use std::time::{Duration, Instant};

use serde_json::{Map, Value};

/// An answer (`update/accepted` or `/rejected`, `start-next/...`) not received within this
/// long after the request: asked again.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// A job handed to the commands with no answer published within this long (the longest
/// command, `sync`, waits at most 10 minutes): asked again (an answer still owed follows once).
pub const RUN_TIMEOUT: Duration = Duration::from_secs(15 * 60);
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// Jobs left (not answered again) remembered, oldest forgotten first.
pub const LEFT_MAX: usize = 64;
/// Passing rejections of one job's update before it is left.
pub const ATTEMPTS_MAX: u32 = 5;
/// Longest `statusDetails` value, in characters.
pub const DETAIL_MAX: usize = 1024;
/// Longest command name in a job document (as `NAME` of `P/D/cmd/NAME`).
const NAME_MAX: usize = 64;

/// A Jobs message the agent subscribes to, under `$aws/things/T/jobs/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobMsg {
    NotifyNext,
    StartNextAccepted,
    StartNextRejected,
    /// `JOBID/update/accepted`.
    UpdateAccepted,
    /// `JOBID/update/rejected`.
    UpdateRejected,
}

/// `$aws/things/{thing}/jobs/{op}`.
pub fn topic(thing: &str, op: &str) -> String {
    format!("$aws/things/{thing}/jobs/{op}")
}

/// The filters the agent subscribes (through a broker a device gets only what it subscribed).
pub fn filters(thing: &str) -> Vec<String> {
    let mut out = Vec::new();
    for op in [
        "notify-next",
        "start-next/accepted",
        "start-next/rejected",
        "+/update/accepted",
        "+/update/rejected",
    ] {
        out.push(topic(thing, op));
    }
    out
}

/// What a topic of `thing`'s jobs is: the message and, for an update's answer, the job id.
pub fn parse_topic<'a>(thing: &str, topic: &'a str) -> Option<(JobMsg, &'a str)> {
    let rest = topic
        .strip_prefix("$aws/things/")?
        .strip_prefix(thing)?
        .strip_prefix("/jobs/")?;
    let msg = match rest {
        "notify-next" => JobMsg::NotifyNext,
        "start-next/accepted" => JobMsg::StartNextAccepted,
        "start-next/rejected" => JobMsg::StartNextRejected,
        _ => {
            let (job, answer) = rest.split_once('/')?;
            let msg = match answer {
                "update/accepted" => JobMsg::UpdateAccepted,
                "update/rejected" => JobMsg::UpdateRejected,
                _ => return None,
            };
            return valid_job_id(job).then_some((msg, job));
        }
    };
    Some((msg, ""))
}

/// Job ids: 1-64 characters of `[a-zA-Z0-9_-]`.
pub fn valid_job_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The result-outbox topic of a job's answer: `jobs/JOBID/VERSION` (the execution's
/// `versionNumber`, the update's `expectedVersion`).
pub fn reply_topic(job_id: &str, version: u64) -> String {
    format!("jobs/{job_id}/{version}")
}

/// The job id and version of a [`reply_topic`].
pub fn parse_reply(topic: &str) -> Option<(&str, u64)> {
    let (job, version) = topic.strip_prefix("jobs/")?.split_once('/')?;
    let version = version.parse().ok()?;
    valid_job_id(job).then_some((job, version))
}

/// A job execution, as `start-next/accepted` carries it.
#[derive(Debug, Clone, PartialEq)]
pub struct Execution {
    pub job_id: String,
    pub version: u64,
    pub document: Value,
}

/// The `execution` of `start-next/accepted` or `notify-next` (`Ok(None)`: no pending job).
pub fn execution(v: &Value) -> Result<Option<Execution>, &'static str> {
    if !v.is_object() {
        return Err("not a JSON object");
    }
    let e = &v["execution"];
    if e.is_null() {
        return Ok(None);
    }
    match (e["jobId"].as_str(), e["versionNumber"].as_u64()) {
        (Some(job), Some(version)) if valid_job_id(job) => Ok(Some(Execution {
            job_id: job.to_owned(),
            version,
            document: e["jobDocument"].clone(),
        })),
        _ => Err("execution without a valid jobId and versionNumber"),
    }
}

/// The command a job document names: its name and the request (`{"id": JOBID, "args":
/// ..}`, §5.4) for the controller; `Err` is the message of a `bad-request`.
pub fn command(exec: &Execution) -> Result<(&str, Vec<u8>), &'static str> {
    let doc = &exec.document;
    let name = match doc["command"].as_str() {
        Some(n) if !n.is_empty() && n.chars().count() <= NAME_MAX => n,
        _ => {
            return Err(
                "the job document is not {\"command\": NAME of 1-64 characters, \"args\": {...}}",
            );
        }
    };
    // Job ids need no JSON escaping.
    let mut req = format!(r#"{{"id":"{}""#, exec.job_id);
    if let Some(args) = doc.get("args") {
        req.push_str(",\"args\":");
        req.push_str(&args.to_string());
    }
    req.push('}');
    Ok((name, req.into_bytes()))
}

/// The update of a job (`jobs/JOBID/update`) for a command response (§5.5): `SUCCEEDED`
/// with `{"result": JSON}` or `FAILED` with `{"error_code", "error_message"}`, and
/// `expectedVersion`. A value over [`DETAIL_MAX`] characters is cut, and
/// `{key}_truncated` says how long it was. The state in the answer tells which status was
/// taken (counted).
#[inline(never)]
pub fn update(version: u64, response: &[u8]) -> Vec<u8> {
    let r: Value = serde_json::from_slice(response).unwrap_or_default();
    let mut d = Map::new();
    let status = if r["ok"] == Value::Bool(true) {
        detail(&mut d, "result", &r["result"].to_string());
        "SUCCEEDED"
    } else {
        let e = &r["error"];
        let code = e["code"].as_str().unwrap_or("failed");
        let message = e["message"].as_str().unwrap_or("unreadable answer");
        detail(&mut d, "error_code", code);
        detail(&mut d, "error_message", message);
        "FAILED"
    };
    format!(
        r#"{{"status":"{status}","statusDetails":{},"expectedVersion":{version},"includeJobExecutionState":true}}"#,
        Value::Object(d)
    )
    .into_bytes()
}

/// Puts `text` under `key`, within the documented value rules: 1-1,024 characters, none of
/// Unicode category C. All but printable ASCII becomes a JSON escape `\uXXXX` (so compact
/// JSON stays valid JSON; the character tables to tell category C apart cost more).
fn detail(d: &mut Map<String, Value>, key: &str, text: &str) {
    use std::fmt::Write;
    let mut clean = String::with_capacity(text.len());
    for c in text.chars() {
        if (' '..='~').contains(&c) {
            clean.push(c);
        } else {
            for u in c.encode_utf16(&mut [0; 2]) {
                let _ = write!(clean, "\\u{u:04x}");
            }
        }
    }
    if clean.is_empty() {
        clean.push('-');
    }
    // ASCII now: bytes are characters.
    let n = clean.len();
    if n > DETAIL_MAX {
        let shown = DETAIL_MAX - 3;
        clean.truncate(shown);
        clean.push_str("...");
        d.insert(
            format!("{key}_truncated"),
            Value::String(format!("{n} characters, the first {shown} shown")),
        );
    }
    d.insert(key.to_owned(), Value::String(clean));
}

/// Codes after which answering the job again cannot help.
fn is_final(code: &str) -> bool {
    matches!(
        code,
        "VersionMismatch"
            | "InvalidStateTransition"
            | "TerminalStateReached"
            | "ResourceNotFound"
            | "InvalidRequest"
            | "InvalidJson"
    )
}

/// What `start-next/accepted` means.
#[derive(Debug, Clone, PartialEq)]
pub enum Started {
    /// Nothing to do: not the answer to this run's outstanding request, no job pending, or
    /// its answer to this version was published on this connection and is awaited.
    Nothing,
    /// The next job is one left before: not answered again (a `notify-next` wakes the agent).
    Left(String),
    /// Unreadable: asked again after a backoff.
    Bad(&'static str),
    /// Take it in: the job document's command runs (or its recorded answer is reported).
    Run(Execution),
}

/// What `update/rejected` of a job means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Not the job in progress (a repeated answer of a job already ended).
    Stale,
    /// Final, or too many attempts: the job is left; the next one is asked for.
    Left,
    /// Asked again after this backoff.
    Retry(Duration),
}

/// The state machine of a device's job queue. Every method that returns a payload wants it
/// published as `start-next` ([`Jobs::ask`]).
#[derive(Debug)]
pub struct Jobs {
    /// Client tokens: unique per run (start time) and per request.
    token_base: u64,
    tokens: u64,
    /// The outstanding `start-next`: its token and when it was sent.
    asking: Option<(String, Instant)>,
    /// The job being answered: id, when taken, when its update was handed to the client.
    current: Option<(String, Instant, Option<Instant>)>,
    /// Passing rejections of the last job answered.
    attempts: Option<(String, u32)>,
    retry_at: Option<Instant>,
    delay: Duration,
    /// Jobs left, at most [`LEFT_MAX`], oldest first.
    left: Vec<String>,
    /// Updates published on this connection and not answered, as [`reply_topic`]s; at most
    /// [`SENT_MAX`] (the oldest forgotten).
    sent: Vec<String>,
}

/// Unanswered updates remembered (the link's window of results in flight).
const SENT_MAX: usize = 32;

/// Pushes `s` to a bounded list, the oldest out first.
fn push_bounded(list: &mut Vec<String>, s: String, max: usize) {
    if list.len() >= max {
        list.remove(0);
    }
    list.push(s);
}

impl Jobs {
    pub fn new(token_base: u64) -> Jobs {
        Jobs {
            token_base,
            tokens: 0,
            asking: None,
            current: None,
            attempts: None,
            retry_at: None,
            delay: RETRY_MIN,
            left: Vec::new(),
            sent: Vec::new(),
        }
    }

    /// A `start-next` request (`{"clientToken": ..}`), now outstanding.
    pub fn ask(&mut self, now: Instant) -> Vec<u8> {
        self.tokens += 1;
        let token = format!("es-{:x}-{}", self.token_base, self.tokens);
        let body = format!(r#"{{"clientToken":"{token}"}}"#).into_bytes();
        self.asking = Some((token, now));
        self.retry_at = None;
        body
    }

    /// A new connection: whatever was outstanding is asked for anew.
    pub fn connected(&mut self, now: Instant) -> Vec<u8> {
        self.current = None;
        self.sent.clear();
        self.ask(now)
    }

    /// Whether `v` answers the outstanding request (then it no longer is).
    fn ours(&mut self, v: &Value) -> bool {
        let ours = self
            .asking
            .as_ref()
            .is_some_and(|(t, _)| v["clientToken"].as_str() == Some(t.as_str()));
        if ours {
            self.asking = None;
        }
        ours
    }

    /// `notify-next`: ask when idle and a job (not one left) is next.
    pub fn notify_next(&mut self, v: &Value, now: Instant) -> Option<Vec<u8>> {
        let next = execution(v).ok()??;
        let busy = self.asking.is_some() || self.current.is_some() || self.retry_at.is_some();
        if busy || self.left.contains(&next.job_id) {
            return None;
        }
        Some(self.ask(now))
    }

    /// `start-next/accepted`.
    pub fn start_next_accepted(&mut self, v: &Value, now: Instant) -> Started {
        // Unreadable: its token is unknown; taken as the answer only if one is awaited.
        let e = execution(v);
        if !(self.ours(v) || e.is_err() && self.asking.take().is_some()) {
            return Started::Nothing;
        }
        let e = match e {
            Err(why) => {
                self.backoff(now);
                return Started::Bad(why);
            }
            Ok(None) => return Started::Nothing,
            Ok(Some(e)) => e,
        };
        if self.left.contains(&e.job_id) {
            return Started::Left(e.job_id);
        }
        let answering = self.sent.contains(&reply_topic(&e.job_id, e.version));
        self.current = Some((e.job_id.clone(), now, answering.then_some(now)));
        if answering {
            return Started::Nothing;
        }
        if self.attempts.as_ref().is_none_or(|(j, _)| *j != e.job_id) {
            self.attempts = Some((e.job_id.clone(), 0));
        }
        Started::Run(e)
    }

    /// `start-next/rejected`: asked again after a backoff; `false` if not ours.
    pub fn start_next_rejected(&mut self, v: &Value, now: Instant) -> bool {
        let ours = self.ours(v);
        if ours {
            self.backoff(now);
        }
        ours
    }

    fn backoff(&mut self, now: Instant) -> Duration {
        let d = self.delay;
        self.retry_at = Some(now + d);
        self.delay = (self.delay * 2).min(RETRY_MAX);
        d
    }

    /// A result is handed to the MQTT client: if it is the update of a job ([`reply_topic`]),
    /// its answer is due.
    pub fn published(&mut self, reply: &str, now: Instant) {
        let Some((job, _)) = parse_reply(reply) else {
            return;
        };
        if let Some(c) = &mut self.current
            && c.0 == job
        {
            c.2 = Some(now);
        }
        if !self.sent.iter().any(|s| s == reply) {
            push_bounded(&mut self.sent, reply.to_owned(), SENT_MAX);
        }
    }

    /// The answer of `job`'s update came: it is no longer awaited; whether it is the job
    /// in progress (then not any more).
    fn answered(&mut self, job: &str) -> bool {
        self.sent
            .retain(|s| parse_reply(s).is_none_or(|(j, _)| j != job));
        let current = self.current.as_ref().is_some_and(|c| c.0 == job);
        if current {
            self.current = None;
        }
        current
    }

    /// `JOBID/update/accepted`: the job ended; the next one is asked for.
    pub fn update_accepted(&mut self, job: &str, now: Instant) -> Option<Vec<u8>> {
        if !self.answered(job) {
            return None;
        }
        self.attempts = None;
        self.delay = RETRY_MIN;
        Some(self.ask(now))
    }

    /// `JOBID/update/rejected` with `code`: what it means and the `start-next` to publish.
    pub fn update_rejected(
        &mut self,
        job: &str,
        code: &str,
        now: Instant,
    ) -> (Refused, Option<Vec<u8>>) {
        if !self.answered(job) {
            return (Refused::Stale, None);
        }
        let tries = match &mut self.attempts {
            Some((j, n)) if j == job => {
                *n += 1;
                *n
            }
            _ => {
                self.attempts = Some((job.to_owned(), 1));
                1
            }
        };
        if is_final(code) || tries >= ATTEMPTS_MAX {
            push_bounded(&mut self.left, job.to_owned(), LEFT_MAX);
            self.attempts = None;
            return (Refused::Left, Some(self.ask(now)));
        }
        (Refused::Retry(self.backoff(now)), None)
    }

    /// When [`Jobs::tick`] has something to do.
    pub fn wake_at(&self) -> Option<Instant> {
        let asking = self.asking.as_ref().map(|(_, t)| *t + ANSWER_TIMEOUT);
        let current = self.current.as_ref().map(|c| match c.2 {
            Some(t) => t + ANSWER_TIMEOUT,
            None => c.1 + RUN_TIMEOUT,
        });
        let mut at = self.retry_at;
        for t in [asking, current].into_iter().flatten() {
            at = Some(at.map_or(t, |a| a.min(t)));
        }
        at
    }

    /// A backoff ended or an answer is overdue: the `start-next` to publish, and whether it
    /// is a retry of a lost exchange (counted).
    pub fn tick(&mut self, now: Instant) -> Option<(Vec<u8>, bool)> {
        if self.wake_at().is_none_or(|t| t > now) {
            return None;
        }
        let backoff = self.retry_at.is_some_and(|t| t <= now);
        self.current = None;
        Some((self.ask(now), !backoff))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const T: &str = "pump-1";

    fn token(payload: &[u8]) -> String {
        let v: Value = serde_json::from_slice(payload).unwrap();
        v["clientToken"].as_str().unwrap().to_owned()
    }

    fn exec(job: &str, version: u64, doc: Value) -> Value {
        json!({"jobId": job, "thingName": T, "status": "IN_PROGRESS", "versionNumber": version,
               "executionNumber": 1, "jobDocument": doc, "queuedAt": 1, "lastUpdatedAt": 1})
    }

    fn accepted(token: &str, execution: Option<Value>) -> Value {
        let mut v = json!({"timestamp": 1, "clientToken": token});
        if let Some(e) = execution {
            v["execution"] = e;
        }
        v
    }

    #[test]
    fn topics_filters_and_replies() {
        assert_eq!(
            filters(T),
            [
                "$aws/things/pump-1/jobs/notify-next",
                "$aws/things/pump-1/jobs/start-next/accepted",
                "$aws/things/pump-1/jobs/start-next/rejected",
                "$aws/things/pump-1/jobs/+/update/accepted",
                "$aws/things/pump-1/jobs/+/update/rejected",
            ]
        );
        assert_eq!(
            parse_topic(T, "$aws/things/pump-1/jobs/notify-next"),
            Some((JobMsg::NotifyNext, ""))
        );
        assert_eq!(
            parse_topic(T, "$aws/things/pump-1/jobs/start-next/accepted"),
            Some((JobMsg::StartNextAccepted, ""))
        );
        assert_eq!(
            parse_topic(T, "$aws/things/pump-1/jobs/job-7/update/rejected"),
            Some((JobMsg::UpdateRejected, "job-7"))
        );
        for other in [
            "$aws/things/pump-1/jobs/notify",
            "$aws/things/pump-1/jobs/start-next",
            "$aws/things/pump-1/jobs/job-7/update",
            "$aws/things/pump-1/jobs/job-7/get/accepted",
            "$aws/things/pump-1/jobs/a.b/update/accepted",
            "$aws/things/pump-12/jobs/notify-next",
            "$aws/things/pump-1/shadow/update/delta",
        ] {
            assert_eq!(parse_topic(T, other), None, "{other}");
        }
        assert_eq!(reply_topic("job-7", 2), "jobs/job-7/2");
        assert_eq!(parse_reply("jobs/job-7/2"), Some(("job-7", 2)));
        assert_eq!(parse_reply("jobs/job-7/x"), None);
        assert_eq!(parse_reply("cmd/ping/result"), None);
        assert_eq!(parse_reply("desired/result"), None);
    }

    #[test]
    fn a_job_document_becomes_a_command_request() {
        let e = |doc| Execution {
            job_id: "j1".into(),
            version: 2,
            document: doc,
        };
        let history = e(json!({"command": "history", "args": {"key": "a"}}));
        let (name, req) = command(&history).unwrap();
        assert_eq!(name, "history");
        let req: Value = serde_json::from_slice(&req).unwrap();
        assert_eq!(req, json!({"id": "j1", "args": {"key": "a"}}));
        let ping = e(json!({"command": "ping"}));
        let (name, req) = command(&ping).unwrap();
        assert_eq!((name, req.as_slice()), ("ping", &br#"{"id":"j1"}"#[..]));
        // Unknown names pass (the controller answers unknown-command), bad documents do not.
        assert!(command(&e(json!({"command": "reboot"}))).is_ok());
        for bad in [
            json!(null),
            json!("ping"),
            json!({"args": {}}),
            json!({"command": 5}),
            json!({"command": ""}),
            json!({"command": "x".repeat(65)}),
        ] {
            assert!(command(&e(bad.clone())).is_err(), "{bad}");
        }
    }

    #[test]
    fn answers_are_read_with_their_execution() {
        let a = accepted("t", Some(exec("j1", 2, json!({"command": "ping"}))));
        let e = execution(&a).unwrap().unwrap();
        assert_eq!((e.job_id.as_str(), e.version), ("j1", 2));
        assert_eq!(e.document["command"], "ping");
        assert_eq!(execution(&json!({"timestamp": 1})), Ok(None));
        assert!(execution(&Value::Null).is_err());
        assert!(execution(&json!({"execution": {"jobId": "j1"}})).is_err());
        assert!(execution(&json!({"execution": {"jobId": "a/b", "versionNumber": 1}})).is_err());
    }

    #[test]
    fn updates_carry_the_answer_in_status_details_within_the_limits() {
        let ok = json!({"id": "j1", "ok": true, "result": {"pong": true, "ts": 5}});
        let u: Value = serde_json::from_slice(&update(3, ok.to_string().as_bytes())).unwrap();
        assert_eq!(
            u,
            json!({"status": "SUCCEEDED", "expectedVersion": 3, "includeJobExecutionState": true,
                   "statusDetails": {"result": "{\"pong\":true,\"ts\":5}"}})
        );
        let err = json!({"id": "j1", "ok": false,
                         "error": {"code": "unknown-command", "message": "unknown command \"x\""}});
        let u: Value = serde_json::from_slice(&update(2, err.to_string().as_bytes())).unwrap();
        assert_eq!(u["status"], "FAILED");
        assert_eq!(u["statusDetails"]["error_code"], "unknown-command");
        assert_eq!(u["statusDetails"]["error_message"], "unknown command \"x\"");
        // Large answers are cut and say so; every value is 1-1024 chars of printable ASCII.
        let big = json!({"id": "j1", "ok": true,
                         "result": {"text": "é\u{200b}\u{7}".repeat(2000), "empty": ""}});
        let u: Value = serde_json::from_slice(&update(2, big.to_string().as_bytes())).unwrap();
        let d = u["statusDetails"].as_object().unwrap();
        assert_eq!(d["result"].as_str().unwrap().chars().count(), DETAIL_MAX);
        assert!(
            d["result_truncated"]
                .as_str()
                .unwrap()
                .ends_with("the first 1021 shown"),
            "{d:?}"
        );
        for (k, v) in d {
            assert!(
                k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b":_-".contains(&b))
            );
            let v = v.as_str().unwrap();
            assert!((1..=DETAIL_MAX).contains(&v.chars().count()));
            assert!(v.bytes().all(|b| (b' '..=b'~').contains(&b)), "{v}");
        }
        assert!(
            d["result"]
                .as_str()
                .unwrap()
                .starts_with("{\"empty\":\"\",\"text\":\"\\u00e9\\u200b\\u0007")
        );
        // An empty message still has a value; an unreadable answer fails the job.
        let empty = json!({"id": "j", "ok": false, "error": {"code": "failed", "message": ""}});
        let u: Value = serde_json::from_slice(&update(1, empty.to_string().as_bytes())).unwrap();
        assert_eq!(u["statusDetails"]["error_message"], "-");
        let u: Value = serde_json::from_slice(&update(1, b"\xa1")).unwrap();
        assert_eq!(u["status"], "FAILED");
        // An astral character becomes a surrogate pair escape (valid JSON).
        let mut d = Map::new();
        detail(&mut d, "k", "a\u{1F600}");
        assert_eq!(d["k"], "a\\ud83d\\ude00");
    }

    #[test]
    fn a_job_runs_from_start_next_to_its_update_then_the_next_is_asked_for() {
        let now = Instant::now();
        let mut j = Jobs::new(0xab);
        let ask = j.connected(now);
        let t = token(&ask);
        assert!(t.starts_with("es-ab-"));
        // Busy: a notify-next asks nothing more.
        let note = json!({"execution": exec("j1", 1, json!({}))});
        assert_eq!(j.notify_next(&note, now), None);
        // Another run's answer (redelivered by the broker) is not ours.
        let doc = json!({"command": "ping"});
        assert_eq!(
            j.start_next_accepted(&accepted("old", Some(exec("j1", 2, doc.clone()))), now),
            Started::Nothing
        );
        let Started::Run(e) = j.start_next_accepted(&accepted(&t, Some(exec("j1", 2, doc))), now)
        else {
            panic!("not run");
        };
        assert_eq!((e.job_id.as_str(), e.version), ("j1", 2));
        assert_eq!(j.wake_at(), Some(now + RUN_TIMEOUT));
        j.published(&reply_topic("j1", 2), now);
        assert_eq!(j.wake_at(), Some(now + ANSWER_TIMEOUT));
        assert_eq!(j.update_accepted("j0", now), None, "another job");
        let next = j.update_accepted("j1", now).unwrap();
        let t2 = token(&next);
        assert_ne!(t, t2);
        assert_eq!(
            j.start_next_accepted(&accepted(&t2, None), now),
            Started::Nothing
        );
        assert_eq!(j.wake_at(), None);
        // Idle: a notify-next with a job asks, one without does not.
        assert_eq!(j.notify_next(&json!({"timestamp": 1}), now), None);
        assert!(j.notify_next(&note, now).is_some());
    }

    #[test]
    fn a_job_whose_answer_was_just_published_is_waited_for_not_taken_again() {
        let now = Instant::now();
        let mut j = Jobs::new(1);
        let ask = j.connected(now);
        // After a restart the recorded answer goes out before start-next is answered.
        j.published(&reply_topic("j1", 2), now);
        let doc = json!({"command": "ping"});
        let out = j.start_next_accepted(&accepted(&token(&ask), Some(exec("j1", 2, doc))), now);
        assert_eq!(out, Started::Nothing, "its answer is on its way");
        assert_eq!(j.wake_at(), Some(now + ANSWER_TIMEOUT));
        assert!(j.update_accepted("j1", now).is_some(), "then the next one");
        // Another version (the answer went out for an older one): taken in.
        j.published(&reply_topic("j2", 2), now);
        let ask = j.ask(now);
        let out =
            j.start_next_accepted(&accepted(&token(&ask), Some(exec("j2", 3, json!({})))), now);
        assert!(matches!(out, Started::Run(_)), "{out:?}");
    }

    #[test]
    fn final_rejections_leave_the_job_and_passing_ones_back_off() {
        let now = Instant::now();
        let mut j = Jobs::new(1);
        let run = |j: &mut Jobs, ask: &[u8], job: &str| {
            let t = token(ask);
            let out = j.start_next_accepted(&accepted(&t, Some(exec(job, 2, json!({})))), now);
            assert!(matches!(out, Started::Run(_)), "{out:?}");
        };
        let ask = j.connected(now);
        run(&mut j, &ask, "j1");
        assert_eq!(
            j.update_rejected("j9", "VersionMismatch", now),
            (Refused::Stale, None)
        );
        let (r, ask) = j.update_rejected("j1", "VersionMismatch", now);
        assert_eq!(r, Refused::Left);
        // The same job next again: left alone, not answered again.
        let t = token(&ask.unwrap());
        let out = j.start_next_accepted(&accepted(&t, Some(exec("j1", 3, json!({})))), now);
        assert_eq!(out, Started::Left("j1".into()));
        let note = json!({"execution": exec("j1", 3, json!({}))});
        assert_eq!(j.notify_next(&note, now), None, "still j1 next");
        // Throttled: start-next again after 1 s, 2 s, ...; left after ATTEMPTS_MAX.
        let ask = j.notify_next(&json!({"execution": exec("j2", 1, json!({}))}), now);
        run(&mut j, &ask.unwrap(), "j2");
        let mut at = now;
        for i in 0..ATTEMPTS_MAX - 1 {
            let (r, ask) = j.update_rejected("j2", "RequestThrottled", at);
            assert_eq!(r, Refused::Retry(RETRY_MIN * 2u32.pow(i)), "attempt {i}");
            assert_eq!(ask, None);
            assert_eq!(j.tick(at), None, "not yet");
            at = j.wake_at().unwrap();
            let (ask, lost) = j.tick(at).unwrap();
            assert!(!lost);
            run(&mut j, &ask, "j2");
        }
        let (r, ask) = j.update_rejected("j2", "InternalError", at);
        assert_eq!(r, Refused::Left);
        assert!(ask.is_some());
        assert_eq!(j.left.len(), 2);
    }

    #[test]
    fn lost_answers_are_asked_for_again_and_left_jobs_are_bounded() {
        let now = Instant::now();
        let mut j = Jobs::new(1);
        let first = j.connected(now);
        assert_eq!(j.tick(now + ANSWER_TIMEOUT / 2), None);
        let (again, lost) = j.tick(now + ANSWER_TIMEOUT).unwrap();
        assert!(lost);
        assert_ne!(token(&first), token(&again));
        // A rejected start-next: backoff, then asked again (not counted as lost).
        let rej = json!({"clientToken": token(&again), "code": "RequestThrottled", "message": "m"});
        assert!(
            !j.start_next_rejected(&json!({}), now),
            "no token: not ours"
        );
        assert!(j.start_next_rejected(&rej, now));
        let (_, lost) = j.tick(j.wake_at().unwrap()).unwrap();
        assert!(!lost);
        for i in 0..LEFT_MAX + 3 {
            let ask = j.ask(now);
            let job = format!("j{i}");
            let t = token(&ask);
            j.start_next_accepted(&accepted(&t, Some(exec(&job, 2, json!({})))), now);
            j.update_rejected(&job, "TerminalStateReached", now);
        }
        assert_eq!(j.left.len(), LEFT_MAX);
        assert_eq!(j.left.first().map(String::as_str), Some("j3"));
    }
}
