//! The process's log filter: checking a filter's text (`[log] level`, the `log-level`
//! command) and the handle that changes the running filter.

use std::sync::{Mutex, PoisonError};

use tracing_subscriber::filter::Targets;
use tracing_subscriber::{Registry, reload};

use crate::model::text::{shorten, suggest};

/// The levels of `[log] level`.
pub const LOG_LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];

/// A level, or comma-separated `target=level` directives (`tracing_subscriber` `Targets` syntax).
pub fn check_log_level(filter: &str) -> Result<(), String> {
    const FORM: &str = "expected a level (trace, debug, info, warn, error, off) or \
                        directives such as \"info,edgesync=debug\"";
    if filter.is_empty() {
        return Err(format!("{FORM}, found an empty string"));
    }
    if let Some(c) = filter
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '=' | ',' | ':' | '.' | '-')))
    {
        return Err(format!(
            "{FORM}, found {:?} ({c:?} is not allowed)",
            shorten(filter)
        ));
    }
    for directive in filter.split(',') {
        let (target, level) = match directive.split_once('=') {
            Some((target, level)) => (Some(target), level),
            None => (None, directive),
        };
        if directive.is_empty() || target.is_some_and(str::is_empty) || level.contains('=') {
            return Err(format!(
                "{FORM}, found {:?} (bad directive {directive:?})",
                shorten(filter)
            ));
        }
        if !LOG_LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            let hint = match suggest(level, LOG_LEVELS) {
                Some(near) => format!("; did you mean {near:?}?"),
                None => String::new(),
            };
            return Err(format!(
                "{FORM}, found {:?} ({level:?} is not a level{hint})",
                shorten(filter)
            ));
        }
    }
    Ok(())
}

/// Why [`LogControl::set`] refused a filter or could not install it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetLogError {
    /// Not `[log] level` syntax (the text of [`check_log_level`]).
    #[error("{0}")]
    Invalid(String),
    #[error("invalid log filter {filter:?}: {reason}")]
    Unparsed { filter: String, reason: String },
    #[error("cannot change the log filter: {0}")]
    Reload(String),
}

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
    pub fn set(&self, filter: &str) -> Result<String, SetLogError> {
        check_log_level(filter).map_err(SetLogError::Invalid)?;
        let new: Targets = filter.parse().map_err(|e| SetLogError::Unparsed {
            filter: filter.to_owned(),
            reason: format!("{e}"),
        })?;
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        self.handle
            .reload(new)
            .map_err(|e| SetLogError::Reload(e.to_string()))?;
        Ok(std::mem::replace(&mut *current, filter.to_owned()))
    }
}
