//! `log-level`: `{"level": "debug"}` changes the running log filter (a level, or
//! `target=level` directives as in `[log] level`) until the next restart. Answers
//! `{"level": new, "previous": old}`; an invalid filter is `failed` and changes nothing.

use std::sync::{Mutex, PoisonError};

use serde_json::{Value, json};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::{Registry, reload};

use super::Services;
use super::request::Args;

/// The handle on the process's running log filter, made where logging is set up (the
/// filter layer must sit directly on the [`Registry`]).
#[derive(Debug)]
pub struct LogControl {
    handle: reload::Handle<Targets, Registry>,
    current: Mutex<String>,
}

impl LogControl {
    /// `current` is the filter the handle holds now, as text.
    pub fn new(handle: reload::Handle<Targets, Registry>, current: impl Into<String>) -> Self {
        Self {
            handle,
            current: Mutex::new(current.into()),
        }
    }

    /// The filter in force, as text.
    pub fn current(&self) -> String {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the filter; returns the previous one. The same syntax as `[log] level`.
    pub fn set(&self, filter: &str) -> Result<String, String> {
        crate::config::check_log_level(filter)?;
        let new: Targets = filter
            .parse()
            .map_err(|e| format!("invalid log filter {filter:?}: {e}"))?;
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        self.handle
            .reload(new)
            .map_err(|e| format!("cannot change the log filter: {e}"))?;
        Ok(std::mem::replace(&mut *current, filter.to_owned()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLevel {
    pub level: String,
}

impl LogLevel {
    pub fn parse(args: &mut Args) -> Result<Self, String> {
        let level = args.str("level")?.ok_or_else(|| {
            args.missing(
                "level",
                "trace, debug, info, warn, error, off, or directives such as \
                 \"info,edgesync=debug\"",
            )
        })?;
        Ok(Self { level })
    }

    pub fn run(&self, svc: &Services) -> Result<Value, String> {
        let Some(log) = &svc.log else {
            return Err("this process has no log filter that can be changed".into());
        };
        let previous = log.set(&self.level)?;
        tracing::info!(level = %self.level, %previous, "log filter changed by a command");
        Ok(json!({"level": self.level, "previous": previous}))
    }
}
