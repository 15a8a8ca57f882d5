//! Live reload (SIGHUP, the `reload` command): the config file is read and validated again;
//! a valid one replaces the running config for everything that can change live, an invalid
//! one changes nothing (every problem is logged and shown in `status`).
//!
//! What changes live: log level, `[sync]` (batch sizes, linger, window, encoding), `[desired]`
//! (rules, conflict policies, handlers, limits), `[telemetry]`, `[control]`, and `[mqtt]`:
//! new broker settings, or new certificate/key files at the same paths, make the link finish
//! the batches in flight and reconnect with them — nothing lost, nothing sent twice. What
//! needs a restart (`device.id`, `[store]`, `local.socket`) keeps its running value, with a
//! warning.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

use crate::config::Config;
pub use crate::health::status::ReloadStatus;
use crate::model::change::now_ms;
use crate::sys::log::LogControl;

/// The running config, shared by every part of the agent. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Live {
    tx: Arc<watch::Sender<Arc<Config>>>,
    path: PathBuf,
    status: Arc<Mutex<ReloadStatus>>,
    log: Option<Arc<LogControl>>,
    board: Option<crate::health::status::StatusBoard>,
}

impl Live {
    pub fn new(config: Arc<Config>, log: Option<Arc<LogControl>>) -> Self {
        let path = config.source.clone();
        Self {
            tx: Arc::new(watch::Sender::new(config)),
            path,
            status: Arc::default(),
            log,
            board: None,
        }
    }

    /// Shows reload outcomes in `status`.
    pub fn with_board(mut self, board: crate::health::status::StatusBoard) -> Self {
        self.board = Some(board);
        self
    }

    fn record(&self, st: &ReloadStatus) {
        *self.status.lock().unwrap_or_else(PoisonError::into_inner) = st.clone();
        if let Some(b) = &self.board {
            b.update(|l| l.reload = st.clone());
        }
    }

    /// The config now.
    pub fn current(&self) -> Arc<Config> {
        Arc::clone(&self.tx.borrow())
    }

    /// Notified on every applied reload.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Config>> {
        self.tx.subscribe()
    }

    pub fn status(&self) -> ReloadStatus {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reads the file again and applies it. Returns the problems of an invalid file (the
    /// running config stays) or what was left for a restart.
    pub fn reload(&self) -> Result<ReloadStatus, ReloadStatus> {
        let mut st = ReloadStatus {
            at: Some(now_ms()),
            ..ReloadStatus::default()
        };
        let new = match Config::load(&self.path) {
            Ok(c) => c,
            Err(errors) => {
                st.problems = errors
                    .problems
                    .iter()
                    .map(|p| format!("{}: {p}", errors.file.display()))
                    .collect();
                for p in &st.problems {
                    tracing::error!("reload refused, keeping the running config: {p}");
                }
                self.record(&st);
                return Err(st);
            }
        };
        let old = self.current();
        let mut new = new;
        // Settings only a restart applies keep their running values.
        if new.device.id != old.device.id {
            st.needs_restart.push("device.id".into());
            new.device = old.device.clone();
        }
        if new.store.path != old.store.path
            || new.store.max_bytes != old.store.max_bytes
            || new.store.when_full != old.store.when_full
            || new.store.cache_size != old.store.cache_size
        {
            st.needs_restart.push("[store]".into());
            new.store = old.store.clone();
        }
        if new.local.socket != old.local.socket {
            st.needs_restart.push("local.socket".into());
            new.local.socket = old.local.socket.clone();
        }
        if new.local.idle_timeout != old.local.idle_timeout {
            st.needs_restart.push("local.idle_timeout".into());
            new.local.idle_timeout = old.local.idle_timeout;
        }
        if new.mqtt.topic_prefix != old.mqtt.topic_prefix {
            st.needs_restart.push("mqtt.topic_prefix".into());
            new.mqtt.topic_prefix = old.mqtt.topic_prefix.clone();
        }
        for k in &st.needs_restart {
            tracing::warn!("reload: {k} changed; it takes effect at the next restart");
        }
        if let Some(log) = &self.log
            && new.log.level != old.log.level
            && let Err(e) = log.set(&new.log.level)
        {
            tracing::warn!("reload: log.level not applied: {e}");
        }
        self.tx.send_replace(Arc::new(new));
        tracing::info!("configuration reloaded from {}", self.path.display());
        self.record(&st);
        Ok(st)
    }
}

/// A fingerprint of the link's settings and of the certificate files' contents: when it
/// changes, the link reconnects (certificate rotation at the same paths included).
pub fn link_fingerprint(c: &Config) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let m = &c.mqtt;
    m.url.to_string().hash(&mut h);
    m.client_id.hash(&mut h);
    m.keep_alive.hash(&mut h);
    m.username.hash(&mut h);
    m.allow_plaintext.hash(&mut h);
    for p in [&m.ca, &m.cert, &m.key, &m.password_file]
        .into_iter()
        .flatten()
    {
        p.hash(&mut h);
        std::fs::read(p).unwrap_or_default().hash(&mut h);
    }
    h.finish()
}
