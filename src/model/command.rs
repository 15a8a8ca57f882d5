//! The names of the commands of `P/D/cmd/NAME` (docs/PROTOCOL.md §4).

/// The commands this agent knows, by their topic name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CommandName {
    Ping,
    Status,
    Sync,
    History,
    Rollback,
    LogLevel,
    Config,
    Reload,
    Purge,
    DesiredReset,
}

impl CommandName {
    /// Every command, in documented order.
    pub const ALL: [CommandName; 10] = [
        CommandName::Ping,
        CommandName::Status,
        CommandName::Sync,
        CommandName::History,
        CommandName::Rollback,
        CommandName::LogLevel,
        CommandName::Config,
        CommandName::Reload,
        CommandName::Purge,
        CommandName::DesiredReset,
    ];

    /// The name in topics and in `[control] allow`.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandName::Ping => "ping",
            CommandName::Status => "status",
            CommandName::Sync => "sync",
            CommandName::History => "history",
            CommandName::Rollback => "rollback",
            CommandName::LogLevel => "log-level",
            CommandName::Config => "config",
            CommandName::Reload => "reload",
            CommandName::Purge => "purge",
            CommandName::DesiredReset => "desired-reset",
        }
    }

    pub fn parse(name: &str) -> Option<CommandName> {
        Self::ALL.into_iter().find(|c| c.as_str() == name)
    }

    /// Destroys data: enabled only when `[control] allow` lists it.
    pub fn destructive(self) -> bool {
        matches!(self, CommandName::Purge | CommandName::DesiredReset)
    }

    /// Every name, for messages.
    pub fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|c| c.as_str()).collect()
    }
}

impl std::fmt::Display for CommandName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
