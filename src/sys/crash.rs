//! Crash points for the inbound crash tests (`tests/inbound.rs`), in debug builds only.
//!
//! With `EDGESYNC_DEBUG_CRASH_AT=NAME` set, the process kills itself with SIGKILL the first
//! time it reaches the point `NAME`: the same death as `kill -9` at a chosen instant (no
//! destructors, no flush, no core file). Release builds compile every point to nothing and
//! never read the variable.
//!
//! Points: `desired-received`, `desired-taken`, `desired-before-puback`,
//! `command-received`, `command-taken`, `command-before-puback`, `command-answered` (the
//! answer recorded and queued, not yet published).

/// The environment variable naming the crash point.
pub const ENV: &str = "EDGESYNC_DEBUG_CRASH_AT";

/// Dies here when `EDGESYNC_DEBUG_CRASH_AT` names `point`.
#[cfg(debug_assertions)]
pub fn point(point: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let at = AT.get_or_init(|| std::env::var(ENV).ok().filter(|s| !s.is_empty()));
    if at.as_deref() != Some(point) {
        return;
    }
    eprintln!("{ENV}={point}: killing this process (debug build crash point)");
    // kill(1) rather than abort(): SIGKILL leaves no core file. std offers no kill(2)
    // without `unsafe`.
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &std::process::id().to_string()])
        .status();
    // Only reached if kill(1) is missing.
    std::process::abort();
}

/// Release builds: no crash points.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn point(_point: &str) {}
