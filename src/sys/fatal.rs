//! What a panic says before the process ends.
//!
//! The shipped build (`[profile.ship]`) aborts on panic: a panic is a bug, every
//! acknowledged change is committed before its answer, so an abort loses no more than the
//! `kill -9` the reliability suites run thousands of times, and systemd restarts the agent.
//! The hook installed here prints one line (journald keeps it) saying what failed and what
//! the agent was doing, from [`during`]. Builds that unwind (tests, `cargo build --release`)
//! print the same line and still turn redb panics into errors (`catch_unwind`).

use std::borrow::Cow;
use std::cell::RefCell;

thread_local! {
    static DOING: RefCell<Vec<Cow<'static, str>>> = const { RefCell::new(Vec::new()) };
}

/// Pops the activity again, also when `f` unwinds.
struct Doing;

impl Drop for Doing {
    fn drop(&mut self) {
        let _ = DOING.try_with(|d| d.borrow_mut().pop());
    }
}

/// Runs `f`; a panic inside it is reported as happening "while {what}".
pub fn during<T>(what: impl Into<Cow<'static, str>>, f: impl FnOnce() -> T) -> T {
    let what = what.into();
    let _ = DOING.try_with(|d| d.borrow_mut().push(what));
    let _doing = Doing;
    f()
}

/// The activity a panic on this thread would be reported with.
pub fn current() -> Option<String> {
    DOING
        .try_with(|d| d.borrow().last().map(|s| s.to_string()))
        .ok()
        .flatten()
}

/// The one-line report of a panic.
pub fn describe(message: &str, location: Option<String>, doing: Option<String>) -> String {
    let mut line = String::from("edgesync: internal error (a bug; please report it)");
    if let Some(d) = doing {
        line.push_str(" while ");
        line.push_str(&d);
    }
    line.push_str(": ");
    line.push_str(message);
    if let Some(l) = location {
        line.push_str(" (at ");
        line.push_str(&l);
        line.push(')');
    }
    line
}

/// Installs the panic hook (the daemon does, at start).
pub fn install_hook() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".to_owned());
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()));
        // Priority 2 (critical) in the journal.
        let line = describe(&message, location, current());
        eprintln!("{}", crate::sys::log::for_stderr(2, &line));
    }));
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn the_activity_is_kept_while_running_and_dropped_after_a_panic() {
        assert_eq!(current(), None);
        during("opening the store file /x", || {
            assert_eq!(current().as_deref(), Some("opening the store file /x"));
            during(format!("step {}", 2), || {
                assert_eq!(current().as_deref(), Some("step 2"));
            });
            assert_eq!(current().as_deref(), Some("opening the store file /x"));
        });
        assert_eq!(current(), None);
        let r = std::panic::catch_unwind(|| during("failing", || panic!("boom")));
        assert!(r.is_err());
        assert_eq!(current(), None);
    }

    #[test]
    fn the_report_says_what_and_where() {
        assert_eq!(
            describe("boom", Some("src/x.rs:3".into()), Some("opening X".into())),
            "edgesync: internal error (a bug; please report it) while opening X: boom \
             (at src/x.rs:3)"
        );
        assert_eq!(
            describe("boom", None, None),
            "edgesync: internal error (a bug; please report it): boom"
        );
    }
}
