//! Live reload (SIGHUP, the `reload` command): the config file is read and validated again;
//! a valid one replaces the running config for everything that can change live, an invalid
//! one changes nothing (every problem is logged and shown in `status`).
//!
//! What changes live: log level, `[sync]` (batch sizes, linger, window, encoding), `[desired]`
//! (rules, conflict policies, handlers, limits), `[telemetry]`, `[control]`, and `[mqtt]`:
//! new broker settings, or new certificate/key files at the same paths, make the link finish
//! the batches in flight and reconnect with them — nothing lost, nothing sent twice. What
//! needs a restart (`device.id`, `[store]`, `local.socket`) keeps its running value, with a
//! warning; a client id that follows the device id (the default) waits for the restart too.

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
        st.needs_restart = keep_until_restart(&old, &mut new);
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

/// Gives `new` the running values of the settings only a restart applies; returns what
/// changed among them (for `status` `reload.needs_restart`).
fn keep_until_restart(old: &Config, new: &mut Config) -> Vec<String> {
    let mut later = Vec::new();
    if new.device.id != old.device.id {
        later.push("device.id".into());
        // A client id that follows the device id (the default) follows it at the restart
        // too: a new client id with the old topics would be a device half renamed.
        if new.mqtt.client_id == new.device.id.as_str() {
            new.mqtt.client_id.clone_from(&old.mqtt.client_id);
        }
        new.device = old.device.clone();
    }
    if new.store.path != old.store.path
        || new.store.max_bytes != old.store.max_bytes
        || new.store.when_full != old.store.when_full
        || new.store.cache_size != old.store.cache_size
        || new.store.classes != old.store.classes
    {
        later.push("[store]".into());
        new.store = old.store.clone();
    }
    if new.local.socket != old.local.socket {
        later.push("local.socket".into());
        new.local.socket = old.local.socket.clone();
    }
    if new.local.idle_timeout != old.local.idle_timeout {
        later.push("local.idle_timeout".into());
        new.local.idle_timeout = old.local.idle_timeout;
    }
    if new.mqtt.topic_prefix != old.mqtt.topic_prefix {
        later.push("mqtt.topic_prefix".into());
        new.mqtt.topic_prefix = old.mqtt.topic_prefix.clone();
    }
    // Local sources are started once, at start.
    if new.sources != old.sources {
        later.push("[[source.mqtt]]".into());
        new.sources.clone_from(&old.sources);
    }
    // The link's profile is made at start (its topics, subscriptions, shadows, jobs).
    if new.aws != old.aws {
        let what = if new.aws.is_some() == old.aws.is_some() {
            "[aws]"
        } else {
            "[cloud]"
        };
        later.push(what.into());
        new.aws.clone_from(&old.aws);
    }
    if new.azure != old.azure {
        let what = if new.azure.is_some() == old.azure.is_some() {
            "[azure]"
        } else {
            "[cloud]"
        };
        if !later.iter().any(|l| l == what) {
            later.push(what.into());
        }
        new.azure.clone_from(&old.azure);
    }
    // The running azure-iot-hub profile keeps its identity: user name and client id.
    if old.azure.is_some() || new.azure.is_some() {
        new.mqtt.username.clone_from(&old.mqtt.username);
        new.mqtt.client_id.clone_from(&old.mqtt.client_id);
    }
    if old.azure.is_some() {
        use crate::config::cloud::{AZURE_KEEP_ALIVE, AZURE_MAX_PAYLOAD};
        let s = &mut new.sync.batch_max_bytes;
        *s = (*s).min(AZURE_MAX_PAYLOAD);
        let k = &mut new.mqtt.keep_alive;
        *k = (*k).clamp(*AZURE_KEEP_ALIVE.start(), *AZURE_KEEP_ALIVE.end());
    }
    // Until then the running aws-iot profile keeps AWS IoT Core's limits, which a file of
    // the other profile was not checked against.
    if old.aws.is_some() {
        use crate::config::cloud::{AWS_KEEP_ALIVE, AWS_MAX_PAYLOAD};
        let s = &mut new.sync.batch_max_bytes;
        *s = (*s).min(AWS_MAX_PAYLOAD);
        let k = &mut new.mqtt.keep_alive;
        *k = (*k).clamp(*AWS_KEEP_ALIVE.start(), *AWS_KEEP_ALIVE.end());
    }
    later
}

/// A fingerprint of the link's settings and of the certificate files' contents: when it
/// changes, the link reconnects (certificate rotation at the same paths included).
pub fn link_fingerprint(c: &Config) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let m = &c.mqtt;
    for url in &m.urls {
        url.to_string().hash(&mut h);
    }
    (m.url_order as u8).hash(&mut h);
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn config(device: &str, mqtt: &str) -> Config {
        let text = format!(
            "[device]\nid = \"{device}\"\n[mqtt]\nurl = \"mqtt://localhost:1883\"\n\
             allow_plaintext = true\n{mqtt}\n[local]\nsocket = \"/run/e/e.sock\"\n"
        );
        Config::from_toml_str(std::path::Path::new("/etc/e/e.toml"), &text).unwrap()
    }

    // Issue 15: a new device.id was kept for the restart, but the client id (its default)
    // followed it at once, while the topics kept the old id.
    #[test]
    fn a_new_device_id_keeps_the_default_client_id_until_the_restart() {
        let old = config("pump-1", "");
        let mut new = config("pump-2", "");
        assert_eq!(new.mqtt.client_id, "pump-2");
        assert_eq!(keep_until_restart(&old, &mut new), ["device.id"]);
        assert_eq!(new.device.id.as_str(), "pump-1");
        assert_eq!(new.mqtt.client_id, "pump-1");
        assert_eq!(link_fingerprint(&new), link_fingerprint(&old));
    }

    #[test]
    fn an_explicit_client_id_stays_live() {
        let old = config("pump-1", "client_id = \"a\"");
        let mut new = config("pump-1", "client_id = \"b\"");
        assert!(keep_until_restart(&old, &mut new).is_empty());
        assert_eq!(new.mqtt.client_id, "b");
        // Also beside a new device id: only a client id equal to the new id waits.
        let mut new = config("pump-2", "client_id = \"b\"");
        assert_eq!(keep_until_restart(&old, &mut new), ["device.id"]);
        assert_eq!(new.mqtt.client_id, "b");
    }

    // Issue 17: the profile and [aws] are read at start; a reload says they wait.
    #[test]
    fn a_new_profile_or_aws_section_waits_for_the_restart() {
        let aws =
            |thing: &str| format!("[cloud]\nprofile = \"aws-iot\"\n[aws]\nthing = \"{thing}\"");
        let old = config("pump-1", "");
        let mut new = config("pump-1", &aws("t1"));
        assert_eq!(keep_until_restart(&old, &mut new), ["[cloud]"]);
        assert!(new.aws.is_none());
        let old = config("pump-1", &aws("t1"));
        let mut new = config("pump-1", &aws("t2"));
        assert_eq!(keep_until_restart(&old, &mut new), ["[aws]"]);
        assert_eq!(new.aws.as_ref().map(|a| a.thing.as_str()), Some("t1"));
        let mut same = config("pump-1", &aws("t1"));
        assert!(keep_until_restart(&old, &mut same).is_empty());
        // Back to the edgesync profile: AWS IoT Core's limits hold until the restart.
        let mut new = config(
            "pump-1",
            "keep_alive = \"2000s\"\n[sync]\nbatch_max_bytes = 200000",
        );
        assert_eq!(keep_until_restart(&old, &mut new), ["[cloud]"]);
        assert!(new.aws.is_some());
        assert_eq!(new.sync.batch_max_bytes, 128_000);
        assert_eq!(new.mqtt.keep_alive, std::time::Duration::from_secs(1200));
    }
}
