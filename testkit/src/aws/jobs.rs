//! The Jobs device API as a plain state machine: a queue of job executions per thing,
//! requests in, responses and notifications out. No sockets.
//!
//! Sources:
//! - <https://docs.aws.amazon.com/iot/latest/developerguide/jobs-mqtt-api.html> (Jobs device
//!   MQTT API): `get`, `start-next`, `JOBID/get` (`$next`), `JOBID/update`, `notify`,
//!   `notify-next`, `expectedVersion`.
//! - <https://docs.aws.amazon.com/iot/latest/developerguide/jobs-api.html> (ErrorResponse):
//!   the error codes and `executionState` on `VersionMismatch` / `InvalidStateTransition`.
//! - <https://docs.aws.amazon.com/iot/latest/developerguide/jobs-comm-notifications.html>:
//!   when `notify` / `notify-next` are published and what they carry.
//! - <https://docs.aws.amazon.com/iot/latest/developerguide/iot-jobs-lifecycle.html>: which
//!   states a device may set and which are terminal.
//! - <https://docs.aws.amazon.com/iot/latest/apireference/API_iot-jobs-data_JobExecutionState.html>:
//!   `statusDetails` keys 1-128 chars of `[a-zA-Z0-9:_-]`, values 1-1,024 chars, no control
//!   characters; job ids 1-64 chars of `[a-zA-Z0-9_-]`.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Map, Value, json};

/// A job execution's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobStatus {
    Queued,
    InProgress,
    Succeeded,
    Failed,
    TimedOut,
    Rejected,
    Removed,
    Canceled,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "QUEUED",
            JobStatus::InProgress => "IN_PROGRESS",
            JobStatus::Succeeded => "SUCCEEDED",
            JobStatus::Failed => "FAILED",
            JobStatus::TimedOut => "TIMED_OUT",
            JobStatus::Rejected => "REJECTED",
            JobStatus::Removed => "REMOVED",
            JobStatus::Canceled => "CANCELED",
        }
    }

    /// The states a device may set with `UpdateJobExecution`.
    fn from_device(s: &str) -> Option<JobStatus> {
        match s {
            "IN_PROGRESS" => Some(JobStatus::InProgress),
            "SUCCEEDED" => Some(JobStatus::Succeeded),
            "FAILED" => Some(JobStatus::Failed),
            "REJECTED" => Some(JobStatus::Rejected),
            _ => None,
        }
    }

    pub fn is_terminal(self) -> bool {
        !matches!(self, JobStatus::Queued | JobStatus::InProgress)
    }
}

/// One job execution on one thing.
#[derive(Debug, Clone, PartialEq)]
pub struct JobExecution {
    pub job_id: String,
    pub thing: String,
    pub document: Value,
    pub status: JobStatus,
    pub status_details: BTreeMap<String, String>,
    /// Starts at 1; every accepted update (device or `start-next`) adds 1.
    pub version_number: u64,
    pub execution_number: u64,
    pub queued_at: u64,
    pub started_at: Option<u64>,
    pub last_updated_at: u64,
}

impl JobExecution {
    fn execution(&self, with_document: bool) -> Value {
        let mut v = json!({
            "jobId": self.job_id,
            "thingName": self.thing,
            "status": self.status.as_str(),
            "statusDetails": self.status_details,
            "queuedAt": self.queued_at,
            "lastUpdatedAt": self.last_updated_at,
            "versionNumber": self.version_number,
            "executionNumber": self.execution_number,
        });
        if let Some(o) = v.as_object_mut() {
            if let Some(t) = self.started_at {
                o.insert("startedAt".into(), t.into());
            }
            if with_document {
                o.insert("jobDocument".into(), self.document.clone());
            }
        }
        v
    }

    fn summary(&self) -> Value {
        let mut v = json!({
            "jobId": self.job_id,
            "queuedAt": self.queued_at,
            "lastUpdatedAt": self.last_updated_at,
            "versionNumber": self.version_number,
            "executionNumber": self.execution_number,
        });
        if let (Some(t), Some(o)) = (self.started_at, v.as_object_mut()) {
            o.insert("startedAt".into(), t.into());
        }
        v
    }

    fn state(&self) -> Value {
        json!({
            "status": self.status.as_str(),
            "statusDetails": self.status_details,
            "versionNumber": self.version_number,
        })
    }
}

/// A Jobs request (the topic after `$aws/things/T/jobs/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobsOp {
    /// `get`: GetPendingJobExecutions.
    GetPending,
    /// `start-next`: StartNextPendingJobExecution.
    StartNext,
    /// `JOBID/get` (`$next` allowed): DescribeJobExecution.
    Describe(String),
    /// `JOBID/update`: UpdateJobExecution.
    Update(String),
}

/// What one request or cloud-side action produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobsOutcome {
    /// `(topic suffix after "jobs/", payload)`, e.g. `("start-next/accepted", ..)`,
    /// `("notify-next", ..)`, in publishing order.
    pub replies: Vec<(String, Value)>,
    /// The error code when the request was rejected.
    pub rejected: Option<&'static str>,
}

/// Test-tool caps (not AWS limits): at the cap `create_job` fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobLimits {
    pub max_things: usize,
    pub max_jobs_per_thing: usize,
}

impl Default for JobLimits {
    fn default() -> Self {
        JobLimits {
            max_things: 1_000,
            max_jobs_per_thing: 1_000,
        }
    }
}

/// Every thing's job executions, in creation order.
#[derive(Debug, Default)]
pub struct JobStore {
    limits: JobLimits,
    things: HashMap<String, Vec<JobExecution>>,
}

fn valid_job_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl JobStore {
    pub fn new(limits: JobLimits) -> JobStore {
        JobStore {
            limits,
            things: HashMap::new(),
        }
    }

    /// One execution, if it exists.
    pub fn get(&self, thing: &str, job_id: &str) -> Option<&JobExecution> {
        self.things.get(thing)?.iter().find(|j| j.job_id == job_id)
    }

    /// Every execution of a thing, in creation order.
    pub fn executions(&self, thing: &str) -> Vec<JobExecution> {
        self.things.get(thing).cloned().unwrap_or_default()
    }

    /// CreateJob for one thing: a QUEUED execution, then `notify` and (if it is next)
    /// `notify-next`. Fails on a bad or duplicate id and at the caps.
    pub fn create(
        &mut self,
        thing: &str,
        job_id: &str,
        document: Value,
        now: u64,
    ) -> Result<JobsOutcome, String> {
        if !valid_job_id(job_id) {
            return Err(format!(
                "invalid job id {job_id:?} (1-64 chars of [a-zA-Z0-9_-])"
            ));
        }
        if !self.things.contains_key(thing) && self.things.len() >= self.limits.max_things {
            return Err(format!(
                "emulator cap: {} things with jobs",
                self.limits.max_things
            ));
        }
        let before = self.snapshot(thing);
        let jobs = self.things.entry(thing.to_owned()).or_default();
        if jobs.iter().any(|j| j.job_id == job_id) {
            return Err(format!(
                "job {job_id} already exists for {thing} (ResourceAlreadyExists)"
            ));
        }
        if jobs.len() >= self.limits.max_jobs_per_thing {
            return Err(format!(
                "emulator cap: {} jobs for {thing}",
                self.limits.max_jobs_per_thing
            ));
        }
        jobs.push(JobExecution {
            job_id: job_id.to_owned(),
            thing: thing.to_owned(),
            document,
            status: JobStatus::Queued,
            status_details: BTreeMap::new(),
            version_number: 1,
            execution_number: 1,
            queued_at: now,
            started_at: None,
            last_updated_at: now,
        });
        Ok(JobsOutcome {
            replies: self.notifications(thing, before, now),
            rejected: None,
        })
    }

    /// CancelJob for one thing: a pending execution becomes CANCELED (notifications as for
    /// any change). Fails if it does not exist or is already terminal.
    pub fn cancel(&mut self, thing: &str, job_id: &str, now: u64) -> Result<JobsOutcome, String> {
        let before = self.snapshot(thing);
        let job = self
            .find_mut(thing, job_id)
            .ok_or_else(|| format!("no job {job_id} for {thing}"))?;
        if job.status.is_terminal() {
            return Err(format!("job {job_id} is already {}", job.status.as_str()));
        }
        job.status = JobStatus::Canceled;
        job.last_updated_at = now;
        Ok(JobsOutcome {
            replies: self.notifications(thing, before, now),
            rejected: None,
        })
    }

    /// Handles one device request published on `$aws/things/{thing}/jobs/...`.
    pub fn handle(&mut self, thing: &str, op: &JobsOp, payload: &[u8], now: u64) -> JobsOutcome {
        let topic = match op {
            JobsOp::GetPending => "get".to_owned(),
            JobsOp::StartNext => "start-next".to_owned(),
            JobsOp::Describe(id) => format!("{id}/get"),
            JobsOp::Update(id) => format!("{id}/update"),
        };
        let req = match parse(payload) {
            Ok(r) => r,
            Err(()) => return reject(&topic, "InvalidJson", "Invalid JSON", None, None, now),
        };
        let token = match req.get("clientToken") {
            None => None,
            Some(Value::String(t)) if t.len() <= 64 => Some(t.clone()),
            Some(_) => {
                return reject(
                    &topic,
                    "InvalidRequest",
                    "Invalid clientToken",
                    None,
                    None,
                    now,
                );
            }
        };
        match op {
            JobsOp::GetPending => {
                let jobs = self
                    .things
                    .get(thing)
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                let list = |s: JobStatus| -> Vec<Value> {
                    jobs.iter()
                        .filter(|j| j.status == s)
                        .map(JobExecution::summary)
                        .collect()
                };
                let body = json!({
                    "inProgressJobs": list(JobStatus::InProgress),
                    "queuedJobs": list(JobStatus::Queued),
                    "timestamp": now,
                });
                accepted(&topic, body, &token)
            }
            JobsOp::StartNext => self.start_next(thing, &topic, &req, &token, now),
            JobsOp::Describe(id) => {
                let with_doc = req
                    .get("includeJobDocument")
                    .and_then(Value::as_bool)
                    .unwrap_or(true);
                let job = if id == "$next" {
                    self.next(thing)
                } else {
                    match self.get(thing, id) {
                        None => {
                            return reject(
                                &topic,
                                "ResourceNotFound",
                                &not_found(thing, id),
                                token,
                                None,
                                now,
                            );
                        }
                        Some(j) if j.status.is_terminal() => {
                            let msg = format!(
                                "Job execution {id} is in terminal state {}",
                                j.status.as_str()
                            );
                            return reject(&topic, "TerminalStateReached", &msg, token, None, now);
                        }
                        Some(j) => Some(j),
                    }
                };
                let mut body = json!({"timestamp": now});
                if let (Some(j), Some(o)) = (job, body.as_object_mut()) {
                    o.insert("execution".into(), j.execution(with_doc));
                }
                accepted(&topic, body, &token)
            }
            JobsOp::Update(id) => self.update(thing, id, &topic, &req, &token, now),
        }
    }

    fn start_next(
        &mut self,
        thing: &str,
        topic: &str,
        req: &Map<String, Value>,
        token: &Option<String>,
        now: u64,
    ) -> JobsOutcome {
        let details = match req.get("statusDetails").map(status_details) {
            None => None,
            Some(Ok(d)) => Some(d),
            Some(Err(msg)) => {
                return reject(topic, "InvalidRequest", &msg, token.clone(), None, now);
            }
        };
        let before = self.snapshot(thing);
        let next_id = self.next(thing).map(|j| j.job_id.clone());
        let mut body = json!({"timestamp": now});
        if let Some(id) = next_id
            && let Some(job) = self.find_mut(thing, &id)
        {
            // An IN_PROGRESS execution is returned as it is (details unchanged).
            if job.status == JobStatus::Queued {
                job.status = JobStatus::InProgress;
                job.started_at = Some(now);
                job.last_updated_at = now;
                job.version_number += 1;
                if let Some(d) = details {
                    job.status_details = d;
                }
            }
            let exec = job.execution(true);
            if let Some(o) = body.as_object_mut() {
                o.insert("execution".into(), exec);
            }
        }
        let mut out = accepted(topic, body, token);
        out.replies.extend(self.notifications(thing, before, now));
        out
    }

    fn update(
        &mut self,
        thing: &str,
        id: &str,
        topic: &str,
        req: &Map<String, Value>,
        token: &Option<String>,
        now: u64,
    ) -> JobsOutcome {
        let invalid = |msg: &str| reject(topic, "InvalidRequest", msg, token.clone(), None, now);
        let Some(status) = req.get("status").and_then(Value::as_str) else {
            return invalid("status is required");
        };
        let Some(status) = JobStatus::from_device(status) else {
            return invalid(&format!(
                "status {status} cannot be set by a device (IN_PROGRESS, SUCCEEDED, FAILED, REJECTED)"
            ));
        };
        let details = match req.get("statusDetails").map(status_details) {
            None => None,
            Some(Ok(d)) => Some(d),
            Some(Err(msg)) => return invalid(&msg),
        };
        let expected = match req.get("expectedVersion") {
            None => None,
            Some(v) => match v.as_u64() {
                Some(n) => Some(n),
                None => return invalid("expectedVersion must be a non-negative integer"),
            },
        };
        let flag = |k: &str| req.get(k).and_then(Value::as_bool).unwrap_or(false);
        let (with_state, with_doc) = (flag("includeJobExecutionState"), flag("includeJobDocument"));
        let before = self.snapshot(thing);
        let exec_number = req.get("executionNumber").and_then(Value::as_u64);
        let Some(job) = self
            .find_mut(thing, id)
            .filter(|j| exec_number.is_none_or(|n| n == j.execution_number))
        else {
            return reject(
                topic,
                "ResourceNotFound",
                &not_found(thing, id),
                token.clone(),
                None,
                now,
            );
        };
        if let Some(v) = expected
            && v != job.version_number
        {
            let state = job.state();
            let msg = format!(
                "Expected version {v} does not match the current version {}",
                job.version_number
            );
            return reject(
                topic,
                "VersionMismatch",
                &msg,
                token.clone(),
                Some(state),
                now,
            );
        }
        if job.status.is_terminal() {
            let state = job.state();
            let msg = format!(
                "Job execution {id} cannot go from {} to {}",
                job.status.as_str(),
                status.as_str()
            );
            return reject(
                topic,
                "InvalidStateTransition",
                &msg,
                token.clone(),
                Some(state),
                now,
            );
        }
        if status == JobStatus::InProgress && job.started_at.is_none() {
            job.started_at = Some(now);
        }
        job.status = status;
        if let Some(d) = details {
            job.status_details = d;
        }
        job.version_number += 1;
        job.last_updated_at = now;
        let mut body = json!({"timestamp": now});
        if let Some(o) = body.as_object_mut() {
            if with_state {
                o.insert("executionState".into(), job.state());
            }
            if with_doc {
                o.insert("jobDocument".into(), job.document.clone());
            }
        }
        let mut out = accepted(topic, body, token);
        out.replies.extend(self.notifications(thing, before, now));
        out
    }

    fn find_mut(&mut self, thing: &str, id: &str) -> Option<&mut JobExecution> {
        self.things
            .get_mut(thing)?
            .iter_mut()
            .find(|j| j.job_id == id)
    }

    /// The next pending execution: the first IN_PROGRESS one, else the first QUEUED one,
    /// in creation order.
    pub fn next(&self, thing: &str) -> Option<&JobExecution> {
        let jobs = self.things.get(thing)?;
        jobs.iter()
            .find(|j| j.status == JobStatus::InProgress)
            .or_else(|| jobs.iter().find(|j| j.status == JobStatus::Queued))
    }

    /// (pending job ids, next job id) before a change.
    fn snapshot(&self, thing: &str) -> (Vec<String>, Option<String>) {
        let pending = self
            .things
            .get(thing)
            .map(|jobs| {
                jobs.iter()
                    .filter(|j| !j.status.is_terminal())
                    .map(|j| j.job_id.clone())
                    .collect()
            })
            .unwrap_or_default();
        (pending, self.next(thing).map(|j| j.job_id.clone()))
    }

    /// `notify` when the pending list gained or lost an execution; `notify-next` when the
    /// next execution is another one (no `execution` field when none is left).
    fn notifications(
        &self,
        thing: &str,
        before: (Vec<String>, Option<String>),
        now: u64,
    ) -> Vec<(String, Value)> {
        let (pending, next) = self.snapshot(thing);
        let mut out = Vec::new();
        if pending != before.0 {
            let jobs = self
                .things
                .get(thing)
                .map(Vec::as_slice)
                .unwrap_or_default();
            let mut lists = Map::new();
            for s in [JobStatus::InProgress, JobStatus::Queued] {
                let l: Vec<Value> = jobs
                    .iter()
                    .filter(|j| j.status == s)
                    .map(JobExecution::summary)
                    .collect();
                if !l.is_empty() {
                    lists.insert(s.as_str().into(), Value::Array(l));
                }
            }
            out.push((
                "notify".to_owned(),
                json!({"timestamp": now, "jobs": lists}),
            ));
        }
        if next != before.1 {
            let mut body = json!({"timestamp": now});
            if let (Some(j), Some(o)) = (self.next(thing), body.as_object_mut()) {
                o.insert("execution".into(), j.execution(true));
            }
            out.push(("notify-next".to_owned(), body));
        }
        out
    }
}

fn parse(payload: &[u8]) -> Result<Map<String, Value>, ()> {
    let text = std::str::from_utf8(payload).map_err(|_| ())?;
    if text.trim().is_empty() {
        return Ok(Map::new());
    }
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(o)) => Ok(o),
        _ => Err(()),
    }
}

/// Checks `statusDetails` against the documented constraints.
fn status_details(v: &Value) -> Result<BTreeMap<String, String>, String> {
    let Some(o) = v.as_object() else {
        return Err("statusDetails must be an object of strings".into());
    };
    let mut out = BTreeMap::new();
    for (k, v) in o {
        let key_ok = (1..=128).contains(&k.chars().count())
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '-'));
        if !key_ok {
            return Err(format!(
                "statusDetails key {k:?} must be 1-128 characters of [a-zA-Z0-9:_-]"
            ));
        }
        let Some(s) = v.as_str() else {
            return Err(format!("statusDetails value of {k} must be a string"));
        };
        if !(1..=1024).contains(&s.chars().count()) || s.chars().any(char::is_control) {
            return Err(format!(
                "statusDetails value of {k} must be 1-1024 characters without control characters"
            ));
        }
        out.insert(k.clone(), s.to_owned());
    }
    Ok(out)
}

fn not_found(thing: &str, id: &str) -> String {
    format!("Job execution {id} not found for thing {thing}")
}

fn accepted(topic: &str, mut body: Value, token: &Option<String>) -> JobsOutcome {
    if let (Some(t), Some(o)) = (token, body.as_object_mut()) {
        o.insert("clientToken".into(), Value::String(t.clone()));
    }
    JobsOutcome {
        replies: vec![(format!("{topic}/accepted"), body)],
        rejected: None,
    }
}

fn reject(
    topic: &str,
    code: &'static str,
    msg: &str,
    token: Option<String>,
    state: Option<Value>,
    now: u64,
) -> JobsOutcome {
    let mut body = json!({"code": code, "message": msg, "timestamp": now});
    if let Some(o) = body.as_object_mut() {
        if let Some(t) = token {
            o.insert("clientToken".into(), Value::String(t));
        }
        if let Some(s) = state {
            o.insert("executionState".into(), s);
        }
    }
    JobsOutcome {
        replies: vec![(format!("{topic}/rejected"), body)],
        rejected: Some(code),
    }
}

/// Counts of what the jobs service did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobCounts {
    /// Accepted requests by operation (`get`, `start-next`, `describe`, `update`).
    pub accepted: BTreeMap<&'static str, u64>,
    /// Rejected requests by error code (`VersionMismatch`, ...).
    pub rejected: BTreeMap<&'static str, u64>,
    /// `notify-next` messages published.
    pub notify_next_published: u64,
}

impl JobCounts {
    pub(crate) fn count(&mut self, op: &JobsOp, out: &JobsOutcome) {
        let name = match op {
            JobsOp::GetPending => "get",
            JobsOp::StartNext => "start-next",
            JobsOp::Describe(_) => "describe",
            JobsOp::Update(_) => "update",
        };
        match out.rejected {
            None => *self.accepted.entry(name).or_default() += 1,
            Some(c) => *self.rejected.entry(c).or_default() += 1,
        }
        self.count_notifications(out);
    }

    pub(crate) fn count_notifications(&mut self, out: &JobsOutcome) {
        self.notify_next_published += out
            .replies
            .iter()
            .filter(|(t, _)| t == "notify-next")
            .count() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply<'a>(out: &'a JobsOutcome, topic: &str) -> Option<&'a Value> {
        out.replies.iter().find(|(t, _)| t == topic).map(|(_, v)| v)
    }

    fn req(s: &mut JobStore, op: JobsOp, body: Value) -> JobsOutcome {
        s.handle("pump", &op, body.to_string().as_bytes(), 50)
    }

    #[test]
    fn create_start_next_and_succeed_with_expected_version() {
        let mut s = JobStore::default();
        let out = s
            .create("pump", "j1", json!({"command":"reboot"}), 10)
            .unwrap();
        let next = reply(&out, "notify-next").unwrap();
        assert_eq!(next["execution"]["jobId"], "j1");
        assert_eq!(next["execution"]["status"], "QUEUED");
        assert_eq!(next["execution"]["jobDocument"]["command"], "reboot");
        assert_eq!(
            reply(&out, "notify").unwrap()["jobs"]["QUEUED"][0]["jobId"],
            "j1"
        );
        // A second job: notify, but the next one did not change.
        let out = s.create("pump", "j2", json!({}), 11).unwrap();
        assert!(reply(&out, "notify-next").is_none());
        assert!(reply(&out, "notify").is_some());

        let out = req(
            &mut s,
            JobsOp::StartNext,
            json!({"clientToken":"s1","statusDetails":{"step":"1"}}),
        );
        let exec = &reply(&out, "start-next/accepted").unwrap()["execution"];
        assert_eq!(exec["status"], "IN_PROGRESS");
        assert_eq!(exec["versionNumber"], 2);
        assert_eq!(exec["statusDetails"]["step"], "1");
        assert_eq!(exec["startedAt"], 50);
        assert_eq!(
            reply(&out, "start-next/accepted").unwrap()["clientToken"],
            "s1"
        );
        assert!(reply(&out, "notify-next").is_none(), "still j1");
        // start-next again returns the IN_PROGRESS one unchanged.
        let out = req(
            &mut s,
            JobsOp::StartNext,
            json!({"statusDetails":{"step":"2"}}),
        );
        let exec = &reply(&out, "start-next/accepted").unwrap()["execution"];
        assert_eq!(
            (exec["jobId"].as_str(), exec["versionNumber"].as_u64()),
            (Some("j1"), Some(2))
        );
        assert_eq!(exec["statusDetails"]["step"], "1");

        let out = req(
            &mut s,
            JobsOp::Update("j1".into()),
            json!({"status":"SUCCEEDED","expectedVersion":2,"statusDetails":{"result":"ok"},"includeJobExecutionState":true,"clientToken":"u"}),
        );
        let acc = reply(&out, "j1/update/accepted").unwrap();
        assert_eq!(
            acc["executionState"],
            json!({"status":"SUCCEEDED","statusDetails":{"result":"ok"},"versionNumber":3})
        );
        assert_eq!(acc["clientToken"], "u");
        assert!(acc.get("jobDocument").is_none());
        // j2 is next now.
        assert_eq!(
            reply(&out, "notify-next").unwrap()["execution"]["jobId"],
            "j2"
        );
        let job = s.get("pump", "j1").unwrap();
        assert_eq!(job.status, JobStatus::Succeeded);
        assert_eq!(job.status_details["result"], "ok");
    }

    #[test]
    fn version_mismatch_and_terminal_updates_carry_the_execution_state() {
        let mut s = JobStore::default();
        s.create("pump", "j1", json!({}), 1).unwrap();
        let out = req(
            &mut s,
            JobsOp::Update("j1".into()),
            json!({"status":"IN_PROGRESS","expectedVersion":7,"clientToken":"v"}),
        );
        assert_eq!(out.rejected, Some("VersionMismatch"));
        let body = reply(&out, "j1/update/rejected").unwrap();
        assert_eq!(body["executionState"]["versionNumber"], 1);
        assert_eq!(body["executionState"]["status"], "QUEUED");
        assert_eq!(body["clientToken"], "v");
        req(
            &mut s,
            JobsOp::Update("j1".into()),
            json!({"status":"FAILED"}),
        );
        let out = req(
            &mut s,
            JobsOp::Update("j1".into()),
            json!({"status":"SUCCEEDED"}),
        );
        assert_eq!(out.rejected, Some("InvalidStateTransition"));
        assert_eq!(
            reply(&out, "j1/update/rejected").unwrap()["executionState"]["status"],
            "FAILED"
        );
        // The last pending job left: notify-next without an execution was sent then.
        let mut s2 = JobStore::default();
        s2.create("pump", "only", json!({}), 1).unwrap();
        let out = req(
            &mut s2,
            JobsOp::Update("only".into()),
            json!({"status":"SUCCEEDED"}),
        );
        assert_eq!(
            reply(&out, "notify-next").unwrap(),
            &json!({"timestamp":50})
        );
    }

    #[test]
    fn invalid_requests() {
        let mut s = JobStore::default();
        s.create("pump", "j1", json!({}), 1).unwrap();
        for (body, code) in [
            (json!({}), "InvalidRequest"),
            (json!({"status":"QUEUED"}), "InvalidRequest"),
            (
                json!({"status":"IN_PROGRESS","statusDetails":{"bad key":"x"}}),
                "InvalidRequest",
            ),
            (
                json!({"status":"IN_PROGRESS","statusDetails":{"k":""}}),
                "InvalidRequest",
            ),
            (
                json!({"status":"IN_PROGRESS","statusDetails":{"k":"x".repeat(1025)}}),
                "InvalidRequest",
            ),
            (
                json!({"status":"IN_PROGRESS","statusDetails":{"k":1}}),
                "InvalidRequest",
            ),
            (
                json!({"status":"IN_PROGRESS","expectedVersion":"x"}),
                "InvalidRequest",
            ),
        ] {
            let out = req(&mut s, JobsOp::Update("j1".into()), body.clone());
            assert_eq!(out.rejected, Some(code), "{body}");
        }
        let out = s.handle("pump", &JobsOp::Update("j1".into()), b"{nope", 1);
        assert_eq!(out.rejected, Some("InvalidJson"));
        let out = req(
            &mut s,
            JobsOp::Update("zz".into()),
            json!({"status":"SUCCEEDED"}),
        );
        assert_eq!(out.rejected, Some("ResourceNotFound"));
        assert!(reply(&out, "zz/update/rejected").is_some());
        assert_eq!(
            s.get("pump", "j1").unwrap().version_number,
            1,
            "nothing changed"
        );
        assert!(
            s.create("pump", "j1", json!({}), 1).is_err(),
            "duplicate id"
        );
        assert!(s.create("pump", "bad id", json!({}), 1).is_err());
    }

    #[test]
    fn pending_list_describe_and_next() {
        let mut s = JobStore::default();
        let out = req(&mut s, JobsOp::StartNext, json!({"clientToken":"e"}));
        assert_eq!(
            reply(&out, "start-next/accepted").unwrap(),
            &json!({"timestamp":50,"clientToken":"e"})
        );
        s.create("pump", "a", json!({"n":1}), 1).unwrap();
        s.create("pump", "b", json!({"n":2}), 2).unwrap();
        // Moving b to IN_PROGRESS makes it next (IN_PROGRESS first).
        let out = req(
            &mut s,
            JobsOp::Update("b".into()),
            json!({"status":"IN_PROGRESS"}),
        );
        assert_eq!(
            reply(&out, "notify-next").unwrap()["execution"]["jobId"],
            "b"
        );
        assert!(reply(&out, "notify").is_none(), "no job added or removed");
        let out = req(&mut s, JobsOp::GetPending, json!({"clientToken":"g"}));
        let body = reply(&out, "get/accepted").unwrap();
        assert_eq!(body["inProgressJobs"][0]["jobId"], "b");
        assert_eq!(body["queuedJobs"][0]["jobId"], "a");
        assert_eq!(body["clientToken"], "g");
        let out = req(&mut s, JobsOp::Describe("$next".into()), json!({}));
        assert_eq!(
            reply(&out, "$next/get/accepted").unwrap()["execution"]["jobId"],
            "b"
        );
        let out = req(
            &mut s,
            JobsOp::Describe("a".into()),
            json!({"includeJobDocument":false}),
        );
        let exec = &reply(&out, "a/get/accepted").unwrap()["execution"];
        assert!(exec.get("jobDocument").is_none());
        let out = req(&mut s, JobsOp::Describe("nope".into()), json!({}));
        assert_eq!(out.rejected, Some("ResourceNotFound"));
        s.cancel("pump", "a", 3).unwrap();
        assert_eq!(s.get("pump", "a").unwrap().status, JobStatus::Canceled);
        let out = req(&mut s, JobsOp::Describe("a".into()), json!({}));
        assert_eq!(out.rejected, Some("TerminalStateReached"));
    }

    #[test]
    fn caps() {
        let mut s = JobStore::new(JobLimits {
            max_things: 1,
            max_jobs_per_thing: 1,
        });
        s.create("pump", "a", json!({}), 1).unwrap();
        assert!(s.create("pump", "b", json!({}), 1).is_err());
        assert!(s.create("other", "a", json!({}), 1).is_err());
    }
}
