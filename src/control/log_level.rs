//! `log-level`: `{"level": "debug"}` changes the running log filter (a level, or
//! `target=level` directives as in `[log] level`) until the next restart. Answers
//! `{"level": new, "previous": old}`; an invalid filter is `failed` and changes nothing.

use serde_json::{Value, json};

use super::Services;
use super::request::Args;

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
        let previous = log.set(&self.level).map_err(|e| e.to_string())?;
        tracing::info!(level = %self.level, %previous, "log filter changed by a command");
        Ok(json!({"level": self.level, "previous": previous}))
    }
}
