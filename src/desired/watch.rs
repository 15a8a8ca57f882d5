//! The `watch` handler: local programs that sent `{"op":"watch","keys":[...]}` on the socket
//! receive `{"event":"desired","id":N,"key":K,"value":V,"version":V}` for matching keys and
//! answer `{"op":"ack","id":N,"ok":true}` (or `"ok":false,"error":"..."`) before the
//! handler's deadline.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::handlers::Outcome;
use crate::model::glob::KeyGlob;

/// Sends one event line to a connection; false when it cannot take it now.
pub type Sink = Box<dyn Fn(String) -> bool + Send + Sync>;

struct Watcher {
    conn: u64,
    globs: Vec<KeyGlob>,
    sink: Sink,
}

#[derive(Default)]
struct Inner {
    next_conn: u64,
    next_id: u64,
    watchers: Vec<Watcher>,
    pending: HashMap<u64, oneshot::Sender<Result<(), String>>>,
}

/// The connections watching keys. Cheap to clone.
#[derive(Clone, Default)]
pub struct Watchers(Arc<Mutex<Inner>>);

impl std::fmt::Debug for Watchers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watchers").finish_non_exhaustive()
    }
}

impl Watchers {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A connection starts watching `globs`; returns its id (for [`Watchers::forget`]).
    /// A connection that watches again replaces its globs.
    pub fn watch(&self, conn: Option<u64>, globs: Vec<KeyGlob>, sink: Sink) -> u64 {
        let mut inner = self.lock();
        let conn = conn.unwrap_or_else(|| {
            inner.next_conn += 1;
            inner.next_conn
        });
        inner.watchers.retain(|w| w.conn != conn);
        inner.watchers.push(Watcher { conn, globs, sink });
        conn
    }

    /// The connection went away.
    pub fn forget(&self, conn: u64) {
        self.lock().watchers.retain(|w| w.conn != conn);
    }

    /// An ack from a watcher; false if no event with that id is waiting.
    pub fn ack(&self, id: u64, result: Result<(), String>) -> bool {
        match self.lock().pending.remove(&id) {
            Some(tx) => tx.send(result).is_ok(),
            None => false,
        }
    }

    /// Delivers a change to the first watcher of `key` and waits for its ack.
    pub async fn deliver(
        &self,
        key: &str,
        value: &Value,
        version: u64,
        deadline: Duration,
    ) -> Outcome {
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut inner = self.lock();
            inner.next_id += 1;
            let id = inner.next_id;
            let Some(w) = inner
                .watchers
                .iter()
                .find(|w| w.globs.iter().any(|g| g.matches(key)))
            else {
                return Outcome::Failed("no local program is watching this key".into());
            };
            let line = json!({"event": "desired", "id": id, "key": key, "value": value, "version": version});
            if !(w.sink)(line.to_string()) {
                return Outcome::Failed("the watching program is not reading its socket".into());
            }
            inner.pending.insert(id, tx);
            id
        };
        let outcome = match tokio::time::timeout(deadline, rx).await {
            Ok(Ok(Ok(()))) => Outcome::Applied(value.clone()),
            Ok(Ok(Err(e))) => Outcome::Failed(e),
            Ok(Err(_)) => Outcome::Failed("the watching program went away".into()),
            Err(_) => Outcome::Failed(format!("no ack within {deadline:?}")),
        };
        self.lock().pending.remove(&id);
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[tokio::test]
    async fn delivered_to_the_matching_watcher_and_acked() {
        let w = Watchers::default();
        let (tx, rx) = mpsc::channel::<String>();
        let tx = Mutex::new(tx);
        let conn = w.watch(
            None,
            vec![KeyGlob("led.*".into())],
            Box::new(move |l| tx.lock().unwrap().send(l).is_ok()),
        );
        let w2 = w.clone();
        let acker = tokio::spawn(async move {
            loop {
                if let Ok(line) = rx.try_recv() {
                    let v: Value = serde_json::from_str(&line).unwrap();
                    assert_eq!(v["key"], "led.mode");
                    assert!(w2.ack(v["id"].as_u64().unwrap(), Ok(())));
                    return;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        let out = w
            .deliver("led.mode", &json!("blink"), 3, Duration::from_secs(5))
            .await;
        assert_eq!(out, Outcome::Applied(json!("blink")));
        acker.await.unwrap();
        assert!(matches!(
            w.deliver("other", &json!(1), 3, Duration::from_secs(1)).await,
            Outcome::Failed(e) if e.contains("no local program")
        ));
        w.forget(conn);
        assert!(matches!(
            w.deliver("led.mode", &json!(1), 3, Duration::from_secs(1))
                .await,
            Outcome::Failed(_)
        ));
    }

    #[tokio::test]
    async fn a_missing_ack_fails_at_the_deadline_and_errors_are_reported() {
        let w = Watchers::default();
        w.watch(None, vec![KeyGlob("*".into())], Box::new(|_| true));
        let out = w
            .deliver("k", &json!(1), 1, Duration::from_millis(50))
            .await;
        assert!(matches!(out, Outcome::Failed(e) if e.contains("no ack")));
        let w2 = w.clone();
        let t = tokio::spawn(
            async move { w2.deliver("k", &json!(1), 1, Duration::from_secs(5)).await },
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Event ids count up; the second event is id 2.
        assert!(w.ack(2, Err("device busy".into())));
        assert_eq!(t.await.unwrap(), Outcome::Failed("device busy".into()));
    }
}
