//! The process's logger: one line an event on stderr, its filter (`[log] level`, the
//! `log-level` command) and the handle that changes the running filter.
//!
//! Under systemd (`JOURNAL_STREAM` names our stderr) each line starts with its syslog
//! priority (`<3>` error … `<7>` debug), which journald strips and keeps, so
//! `journalctl -p warning` works; the journal adds the time. Elsewhere a line starts with
//! the UTC time. A subscriber of our own rather than `tracing-subscriber`: the agent has no
//! spans, and its registry and formatter cost ~40 KB of the ARM size budget.

use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::sync::{Mutex, PoisonError, RwLock};

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_core::Interest;

use crate::model::text::{shorten, suggest, utc};

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

/// A parsed filter: the level of the longest matching `target=level` directive, else the
/// default (`tracing_subscriber`'s `Targets` semantics: a target matches its module path
/// prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    default: LevelFilter,
    directives: Vec<(String, LevelFilter)>,
}

impl Filter {
    /// The text must pass [`check_log_level`].
    pub fn parse(text: &str) -> Result<Self, String> {
        check_log_level(text)?;
        let mut filter = Filter {
            default: LevelFilter::OFF,
            directives: Vec::new(),
        };
        for directive in text.split(',') {
            let (target, level) = match directive.split_once('=') {
                Some((target, level)) => (Some(target), level),
                None => (None, directive),
            };
            let level = match level.to_ascii_lowercase().as_str() {
                "trace" => LevelFilter::TRACE,
                "debug" => LevelFilter::DEBUG,
                "info" => LevelFilter::INFO,
                "warn" => LevelFilter::WARN,
                "error" => LevelFilter::ERROR,
                _ => LevelFilter::OFF,
            };
            match target {
                Some(t) => filter.directives.push((t.to_owned(), level)),
                None => filter.default = level,
            }
        }
        // Longest target first: the most specific directive wins.
        filter
            .directives
            .sort_by_key(|d| std::cmp::Reverse(d.0.len()));
        Ok(filter)
    }

    fn level_for(&self, target: &str) -> LevelFilter {
        self.directives
            .iter()
            .find(|(t, _)| {
                target
                    .strip_prefix(t.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
            })
            .map_or(self.default, |d| d.1)
    }

    pub fn enabled(&self, target: &str, level: &Level) -> bool {
        self.level_for(target) >= *level
    }

    fn max(&self) -> LevelFilter {
        self.directives
            .iter()
            .map(|d| d.1)
            .fold(self.default, LevelFilter::max)
    }
}

/// The syslog priority journald reads from a line's `<N>` prefix.
pub fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// Whether `JOURNAL_STREAM` (`DEVICE:INODE`, set by systemd) names this stderr: then the
/// journal reads the lines, so they carry priorities and no time. Compared, not just
/// present: a child of a service that redirected its stderr inherits the variable.
pub fn journal_stream(value: Option<&str>, stderr: Option<(u64, u64)>) -> bool {
    let parsed = value.and_then(|v| {
        let (dev, ino) = v.split_once(':')?;
        Some((dev.parse::<u64>().ok()?, ino.parse::<u64>().ok()?))
    });
    parsed.is_some() && parsed == stderr
}

/// Whether this process's stderr is the journal's stream (computed once).
pub fn on_journal() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| journal_stream(std::env::var("JOURNAL_STREAM").ok().as_deref(), stderr_id()))
}

/// `text` with each line prefixed `<priority>` on the journal's stream, else unchanged:
/// for what is printed to stderr outside the logger (a failed command, a panic).
pub fn for_stderr(priority: u8, text: &str) -> String {
    if !on_journal() {
        return text.to_owned();
    }
    text.lines()
        .map(|l| format!("<{priority}>{l}\n"))
        .collect::<String>()
        .trim_end()
        .to_owned()
}

/// Device and inode of this process's stderr.
fn stderr_id() -> Option<(u64, u64)> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let fd = std::io::stderr().as_fd().try_clone_to_owned().ok()?;
    let meta = std::fs::File::from(fd).metadata().ok()?;
    Some((meta.dev(), meta.ino()))
}

/// One event as a line (without the newline): `<N>LEVEL message key=value ...` for the
/// journal, `TIME  LEVEL message key=value ...` elsewhere.
pub fn format_line(journal: bool, now_ms: u64, meta: &Metadata<'_>, event: &Event<'_>) -> String {
    let level = meta.level();
    let mut line = String::with_capacity(128);
    if journal {
        let _ = write!(line, "<{}>{} ", priority(level), level.as_str());
    } else {
        let _ = write!(line, "{}  {:>5} ", utc(now_ms), level.as_str());
    }
    let mut fields = Fields {
        line,
        rest: String::new(),
    };
    event.record(&mut fields);
    let Fields { mut line, rest } = fields;
    line.push_str(&rest);
    // One record a line: a newline inside a message would start an unprefixed line.
    if line.contains('\n') {
        line = line.replace('\n', " ");
    }
    line
}

/// The message first, then the other fields as ` key=value`.
struct Fields {
    line: String,
    rest: String,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.line, "{value:?}");
        } else {
            let _ = write!(self.rest, " {}={value:?}", field.name());
        }
    }
}

/// The process's subscriber: the filter, and where lines go.
#[derive(Debug)]
pub struct Logger {
    filter: RwLock<Filter>,
    journal: bool,
}

impl Logger {
    pub fn new(filter: Filter) -> Self {
        Self {
            filter: RwLock::new(filter),
            journal: on_journal(),
        }
    }

    fn filter(&self) -> std::sync::RwLockReadGuard<'_, Filter> {
        self.filter.read().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Subscriber for Logger {
    fn register_callsite(&self, _: &'static Metadata<'static>) -> Interest {
        // Decided per event: the filter can change while running.
        Interest::sometimes()
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(self.filter().max())
    }

    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        self.filter().enabled(meta.target(), meta.level())
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut line = format_line(self.journal, now_ms, event.metadata(), event);
        line.push('\n');
        // One write a line, so lines of two threads do not interleave.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

/// Why [`LogControl::set`] refused a filter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetLogError {
    /// Not `[log] level` syntax (the text of [`check_log_level`]).
    #[error("{0}")]
    Invalid(String),
}

/// The handle on the process's running log filter.
#[derive(Debug)]
pub struct LogControl {
    logger: std::sync::Arc<Logger>,
    current: Mutex<String>,
}

impl LogControl {
    /// Installs a [`Logger`] with the first of `candidates` that parses (else `info`) as
    /// the process's subscriber. Returns `None` if one was installed already.
    pub fn install(candidates: &[&str]) -> Option<Self> {
        let (filter, text) = candidates
            .iter()
            .find_map(|c| Filter::parse(c).ok().map(|f| (f, *c)))
            .unwrap_or_else(|| {
                (
                    Filter {
                        default: LevelFilter::INFO,
                        directives: Vec::new(),
                    },
                    "info",
                )
            });
        let logger = std::sync::Arc::new(Logger::new(filter));
        tracing::subscriber::set_global_default(logger.clone()).ok()?;
        Some(Self {
            logger,
            current: Mutex::new(text.to_owned()),
        })
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
        let new = Filter::parse(filter).map_err(SetLogError::Invalid)?;
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        *self
            .logger
            .filter
            .write()
            .unwrap_or_else(PoisonError::into_inner) = new;
        // Callsites and the global maximum level were computed from the old filter.
        tracing_core::callsite::rebuild_interest_cache();
        Ok(std::mem::replace(&mut *current, filter.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_pick_the_longest_matching_target() {
        let f = Filter::parse("warn,edgesync=info,edgesync::link=debug,rumqttc=off").unwrap();
        assert!(f.enabled("edgesync::link", &Level::DEBUG));
        assert!(f.enabled("edgesync::link::engine", &Level::DEBUG));
        assert!(!f.enabled("edgesync::linker", &Level::DEBUG));
        assert!(f.enabled("edgesync::linker", &Level::INFO));
        assert!(!f.enabled("edgesync::store", &Level::DEBUG));
        assert!(!f.enabled("rumqttc::state", &Level::ERROR));
        assert!(f.enabled("redb", &Level::WARN));
        assert!(!f.enabled("redb", &Level::INFO));
        assert_eq!(f.max(), LevelFilter::DEBUG);
        let f = Filter::parse("DEBUG").unwrap();
        assert!(f.enabled("x", &Level::DEBUG) && !f.enabled("x", &Level::TRACE));
        assert_eq!(Filter::parse("off").unwrap().max(), LevelFilter::OFF);
        assert!(Filter::parse("loud").is_err());
        assert!(Filter::parse("a=b=c").is_err());
    }

    #[test]
    fn priorities_are_syslog_levels() {
        assert_eq!(priority(&Level::ERROR), 3);
        assert_eq!(priority(&Level::WARN), 4);
        assert_eq!(priority(&Level::INFO), 6);
        assert_eq!(priority(&Level::DEBUG), 7);
        assert_eq!(priority(&Level::TRACE), 7);
    }

    #[test]
    fn the_journal_is_ours_only_when_journal_stream_names_our_stderr() {
        let ours = Some((8, 123_456));
        assert!(journal_stream(Some("8:123456"), ours));
        assert!(!journal_stream(Some("8:123457"), ours), "inherited");
        assert!(!journal_stream(Some("8:123456"), None));
        assert!(!journal_stream(None, ours));
        assert!(!journal_stream(Some("garbage"), ours));
        assert!(!journal_stream(Some(""), None));
    }

    /// Formats the events it sees, as the logger does.
    struct Capture(Mutex<Vec<String>>, bool);

    impl Subscriber for Capture {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, e: &Event<'_>) {
            let line = format_line(self.1, 1_764_150_000_123, e.metadata(), e);
            self.0.lock().unwrap().push(line);
        }
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }

    fn lines(journal: bool) -> Vec<String> {
        let capture = std::sync::Arc::new(Capture(Mutex::new(Vec::new()), journal));
        tracing::subscriber::with_default(capture.clone(), || {
            tracing::warn!(key = 3, name = "a b", "queue {} full", "x");
            tracing::error!("two\nlines");
            tracing::info!(n = 1);
        });
        capture.0.lock().unwrap().clone()
    }

    #[test]
    fn journal_lines_start_with_their_priority() {
        assert_eq!(
            lines(true),
            [
                r#"<4>WARN queue x full key=3 name="a b""#,
                "<3>ERROR two lines",
                "<6>INFO  n=1",
            ]
        );
    }

    #[test]
    fn other_lines_start_with_the_time() {
        assert_eq!(
            lines(false),
            [
                r#"2025-11-26T09:40:00.123Z   WARN queue x full key=3 name="a b""#,
                "2025-11-26T09:40:00.123Z  ERROR two lines",
                "2025-11-26T09:40:00.123Z   INFO  n=1",
            ]
        );
    }
}
