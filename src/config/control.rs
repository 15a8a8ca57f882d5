//! Configuration types of commands over MQTT (`[control]`), produced by the validation in
//! this module's parent.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::model::command::CommandName;

/// Default `[control] replay_window`.
pub const DEFAULT_REPLAY_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// Default `[control] replay_max`.
pub const DEFAULT_REPLAY_MAX: usize = 10_000;

/// `[control]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlConfig {
    /// Commands that may run; others are answered `forbidden`. Default: every
    /// non-destructive command.
    pub allow: BTreeSet<CommandName>,
    /// Recorded ids are kept at least this long after their receipt. Default 24 h.
    pub replay_window: Duration,
    /// At most this many ids are kept (the oldest answered ones go first). Default 10000.
    pub replay_max: usize,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            allow: CommandName::ALL
                .into_iter()
                .filter(|c| !c.destructive())
                .collect(),
            replay_window: DEFAULT_REPLAY_WINDOW,
            replay_max: DEFAULT_REPLAY_MAX,
        }
    }
}
