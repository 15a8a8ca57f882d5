//! `sync`: `{"timeout": ms}` (default 30 s, at most 10 min) waits until the queue is empty
//! (every queued change acknowledged by the broker) or the timeout passes, and answers
//! `{"drained": bool, "depth": n}`. It runs in its own task: other commands go on meanwhile.
//! When the agent stops, it answers at once with what it has.

use std::time::Duration;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::Services;
use super::request::Args;

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
pub const MAX_TIMEOUT: Duration = Duration::from_secs(600);
/// How often the queue depth is looked at (it is an in-memory figure).
const POLL: Duration = Duration::from_millis(20);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncQueue {
    pub timeout: Duration,
}

impl SyncQueue {
    pub fn parse(args: &mut Args) -> Result<Self, String> {
        let timeout = match args.u64("timeout")? {
            None => DEFAULT_TIMEOUT,
            Some(ms) if ms <= MAX_TIMEOUT.as_millis() as u64 => Duration::from_millis(ms),
            Some(ms) => {
                return Err(format!(
                    "sync: args.timeout must be at most {} ms (10 min), found {ms}",
                    MAX_TIMEOUT.as_millis()
                ));
            }
        };
        Ok(Self { timeout })
    }

    pub async fn run(&self, svc: &Services, stop: CancellationToken) -> Value {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let depth = svc.outbox.stats().depth;
            if depth == 0 {
                return json!({"drained": true, "depth": 0});
            }
            if tokio::time::Instant::now() >= deadline || stop.is_cancelled() {
                return json!({"drained": false, "depth": depth});
            }
            tokio::select! {
                () = tokio::time::sleep(POLL.min(deadline - tokio::time::Instant::now())) => {}
                () = stop.cancelled() => {}
            }
        }
    }
}
