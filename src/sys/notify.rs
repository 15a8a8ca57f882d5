//! systemd integration (`Type=notify`): the sd_notify protocol spoken in-process over a
//! Unix datagram socket, and the watchdog that pings only while the agent makes progress.
//!
//! # Messages
//! - `READY=1` (with a first `STATUS=`) once the store is open and the local socket is bound
//!   ([`crate::agent`]): `systemctl start edgesync` returns when reports can be sent.
//! - `STATUS=online · 0 queued · desired v3`: connection, queue depth, applied desired
//!   version, and what the watchdog waits for when something is stuck; sent when it changes,
//!   checked every [`STATUS_EVERY`]. `systemctl status edgesync` shows it.
//! - `WATCHDOG=1` every `WatchdogSec/2` (`$WATCHDOG_USEC / 2`), but only when every
//!   monitored loop proved itself alive within that half interval:
//!   - the **store writer**: a probe ([`crate::store::Outbox::heartbeat`]) travels through
//!     the writer's channel and is answered by the writer thread (behind every commit queued
//!     before it, no fsync of its own), again and again; a writer stuck in an fsync or a
//!     commit leaves the probe unanswered;
//!   - the **MQTT link** ([`crate::link::run`]): its loop beats a [`Heartbeat`] every time it
//!     comes round and at least every [`Heartbeat::pulse`] while idle, also while offline in
//!     its reconnect backoff, so an idle agent still pings;
//!   - the runtime itself: the supervisor is a task on the same runtime.
//!
//!   A monitored loop that stays silent stops the pings, systemd kills the agent with
//!   SIGABRT after `WatchdogSec` and `Restart=on-failure` starts it again. The silent loop is
//!   logged once and named in `STATUS=`.
//! - `STOPPING=1` when the shutdown starts.
//! - `EXTEND_TIMEOUT_USEC=` while a slow store opens (after a crash redb may check and
//!   repair the file), so that `TimeoutStartSec=` does not kill a start that makes progress;
//!   at most for [`EXTEND_START_MAX`].
//!
//! Nothing is sent unless `$NOTIFY_SOCKET` is set (a path, or `@name` for an abstract
//! socket); the watchdog runs only when `$WATCHDOG_USEC` is set and `$WATCHDOG_PID`, if set,
//! is this process. Send failures are logged at debug level and otherwise ignored. Programs
//! the agent runs (handlers) inherit these variables; with `NotifyAccess=main` systemd
//! ignores anything they send.
//!
//! # Test hooks (debug builds only)
//! Compiled only with `debug_assertions` (what `cargo test` builds), absent from release
//! and `ship` builds:
//! - `EDGESYNC_DEBUG_STALL_WRITER_AFTER_MS=N`: the store writer thread blocks for good on
//!   the first request it takes after N ms (as if an fsync never returned);
//! - `EDGESYNC_DEBUG_STALL_LINK_AFTER_MS=N`: after N ms the link loop stops coming round
//!   (its reconnect wait never ends and its heartbeat stops).

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Longest pause between two beats of an idle monitored loop.
const MAX_PULSE: Duration = Duration::from_secs(1);
/// While the store opens, `EXTEND_TIMEOUT_USEC` is sent this often...
const EXTEND_EVERY: Duration = Duration::from_secs(10);
/// ...each granting this much more time...
const EXTEND_BY: Duration = Duration::from_secs(30);
/// ...for at most this long in total; then `TimeoutStartSec=` applies again.
pub const EXTEND_START_MAX: Duration = Duration::from_secs(30 * 60);

/// Sends sd_notify messages to `$NOTIFY_SOCKET`; does nothing without one. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    target: Option<Arc<Target>>,
}

#[derive(Debug)]
struct Target {
    socket: UnixDatagram,
    addr: SocketAddr,
    name: String,
}

impl Notifier {
    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier::default()
    }

    /// The notifier of `$NOTIFY_SOCKET` (disabled when unset, or when it cannot be used:
    /// that is logged).
    pub fn from_env() -> Notifier {
        let Some(value) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier::disabled();
        };
        match Notifier::to_socket(&value.to_string_lossy()) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("NOTIFY_SOCKET={value:?} not usable, systemd is not notified: {e}");
                Notifier::disabled()
            }
        }
    }

    /// A notifier sending to `name`: a socket path, or `@name` for an abstract socket.
    pub fn to_socket(name: &str) -> io::Result<Notifier> {
        let addr = if let Some(abstract_name) = name.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(abstract_name.as_bytes())?
        } else if name.starts_with('/') {
            SocketAddr::from_pathname(name)?
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "neither an absolute path nor @abstract",
            ));
        };
        let socket = UnixDatagram::unbound()?;
        // Never hold up the runtime: a full receive queue drops the message.
        socket.set_nonblocking(true)?;
        Ok(Notifier {
            target: Some(Arc::new(Target {
                socket,
                addr,
                name: name.to_owned(),
            })),
        })
    }

    /// Whether messages go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one message (`KEY=value` lines); false if it could not be sent.
    pub fn send(&self, message: &str) -> bool {
        let Some(t) = &self.target else {
            return false;
        };
        match t.socket.send_to_addr(message.as_bytes(), &t.addr) {
            Ok(_) => true,
            Err(e) => {
                tracing::debug!(socket = %t.name, "sd_notify {message:?} not sent: {e}");
                false
            }
        }
    }

    /// `READY=1` with the first status line.
    pub fn ready(&self, status: &str) -> bool {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)))
    }

    /// `STATUS=...` (made one line).
    pub fn status(&self, status: &str) -> bool {
        self.send(&format!("STATUS={}", one_line(status)))
    }

    /// `STOPPING=1` with a last status line.
    pub fn stopping(&self, status: &str) -> bool {
        self.send(&format!("STOPPING=1\nSTATUS={}", one_line(status)))
    }

    /// `WATCHDOG=1`.
    pub fn watchdog(&self) -> bool {
        self.send("WATCHDOG=1")
    }

    /// `EXTEND_TIMEOUT_USEC=`: the current start (or stop) may take `by` longer from now.
    pub fn extend_timeout(&self, by: Duration) -> bool {
        self.send(&format!("EXTEND_TIMEOUT_USEC={}", by.as_micros()))
    }

    /// Runs `work`, asking systemd for more start time while it takes long (a store being
    /// checked or repaired), for at most [`EXTEND_START_MAX`].
    pub async fn extend_while<T>(&self, what: &str, work: impl Future<Output = T>) -> T {
        if !self.is_enabled() {
            return work.await;
        }
        tokio::pin!(work);
        let started = Instant::now();
        let mut every =
            tokio::time::interval_at(tokio::time::Instant::now() + EXTEND_EVERY, EXTEND_EVERY);
        loop {
            tokio::select! {
                out = &mut work => return out,
                _ = every.tick() => {
                    if started.elapsed() < EXTEND_START_MAX {
                        tracing::info!("{what} is taking long ({:.0?}); asking systemd for more time", started.elapsed());
                        self.status(&format!("starting: {what} ({:.0?})", started.elapsed()));
                        self.extend_timeout(EXTEND_BY);
                    }
                }
            }
        }
    }
}

/// Control characters would end or corrupt the message: spaces instead.
pub fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// The watchdog interval systemd expects pings within, from `$WATCHDOG_USEC` and
/// `$WATCHDOG_PID`; none when unset, zero, unreadable or meant for another process.
pub fn watchdog_from_env() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    parse_watchdog(usec.as_deref(), pid.as_deref(), std::process::id())
}

fn parse_watchdog(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok()?;
    if usec == 0 {
        return None;
    }
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(me)
    {
        return None;
    }
    Some(Duration::from_micros(usec))
}

/// Microseconds on a monotonic clock (since the first call).
fn mono_us() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    u64::try_from(base.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// The last sign of life of one monitored loop. Cheap to clone; beating is one atomic store.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    inner: Arc<BeatInner>,
}

#[derive(Debug)]
struct BeatInner {
    name: &'static str,
    last_us: AtomicU64,
    pulse: Duration,
    stall: DebugStall,
}

impl Heartbeat {
    /// A heartbeat named `name` (in logs and the status line) whose loop beats at least every
    /// `pulse` while idle. Counts as beaten now.
    pub fn new(name: &'static str, pulse: Duration) -> Heartbeat {
        Heartbeat::with_stall(name, pulse, DebugStall::none())
    }

    fn with_stall(name: &'static str, pulse: Duration, stall: DebugStall) -> Heartbeat {
        Heartbeat {
            inner: Arc::new(BeatInner {
                name,
                last_us: AtomicU64::new(mono_us()),
                pulse,
                stall,
            }),
        }
    }

    pub fn name(&self) -> &'static str {
        self.inner.name
    }

    /// How often an idle loop must beat.
    pub fn pulse(&self) -> Duration {
        self.inner.pulse
    }

    /// The loop is alive now.
    pub fn beat(&self) {
        if self.inner.stall.is_due() {
            return;
        }
        self.inner.last_us.store(mono_us(), Ordering::Relaxed);
    }

    /// Time since the last beat.
    pub fn silence(&self) -> Duration {
        let last = self.inner.last_us.load(Ordering::Relaxed);
        Duration::from_micros(mono_us().saturating_sub(last))
    }
}

/// What a monitored loop with an optional [`Heartbeat`] uses: [`Pulse::beat`] each time it
/// comes round, and [`Pulse::tick`] as a `select!` branch so that it comes round at least
/// every pulse while idle. Without a heartbeat both do nothing (no timer at all).
#[derive(Debug)]
pub struct Pulse {
    heartbeat: Option<Heartbeat>,
    interval: Option<tokio::time::Interval>,
}

impl Pulse {
    pub fn new(heartbeat: Option<&Heartbeat>) -> Pulse {
        let interval = heartbeat.map(|h| {
            let mut i = tokio::time::interval(h.pulse());
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        });
        Pulse {
            heartbeat: heartbeat.cloned(),
            interval,
        }
    }

    pub fn beat(&self) {
        if let Some(h) = &self.heartbeat {
            h.beat();
        }
    }

    /// Resolves every pulse (never without a heartbeat, or once a debug stall is due).
    /// Cancel-safe.
    pub async fn tick(&mut self) {
        match (&self.heartbeat, &mut self.interval) {
            (Some(h), Some(i)) if !h.inner.stall.is_due() => {
                i.tick().await;
            }
            _ => std::future::pending().await,
        }
    }
}

/// Sleeps for `d`, beating `heartbeat` meanwhile at least every pulse (a loop waiting on
/// purpose, e.g. in a reconnect backoff, is alive).
pub async fn sleep_beating(heartbeat: Option<&Heartbeat>, d: Duration) {
    let Some(h) = heartbeat else {
        return tokio::time::sleep(d).await;
    };
    let end = tokio::time::Instant::now() + d;
    loop {
        if h.inner.stall.is_due() {
            // Test hook: the loop is stuck here from now on.
            return std::future::pending().await;
        }
        h.beat();
        let now = tokio::time::Instant::now();
        if now >= end {
            return;
        }
        tokio::time::sleep_until(end.min(now + h.pulse())).await;
    }
}

/// Debug builds only: a point in time after which a test wants a loop stuck (see the module
/// docs). Always "never" in release builds.
#[derive(Debug, Clone, Copy)]
pub struct DebugStall {
    #[cfg(debug_assertions)]
    at: Option<Instant>,
}

impl DebugStall {
    pub fn none() -> DebugStall {
        DebugStall {
            #[cfg(debug_assertions)]
            at: None,
        }
    }

    /// Reads `var` (milliseconds from now) in debug builds; none in release builds.
    pub fn from_env(var: &str) -> DebugStall {
        #[cfg(debug_assertions)]
        {
            let at = std::env::var(var)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(|ms| Instant::now() + Duration::from_millis(ms));
            if at.is_some() {
                tracing::warn!("{var} is set: a test will see this agent stall");
            }
            DebugStall { at }
        }
        #[cfg(not(debug_assertions))]
        {
            let _ = var;
            DebugStall {}
        }
    }

    pub fn is_due(&self) -> bool {
        #[cfg(debug_assertions)]
        {
            self.at.is_some_and(|at| Instant::now() >= at)
        }
        #[cfg(not(debug_assertions))]
        {
            false
        }
    }

    /// Blocks the calling thread for good once due (the store writer's hook).
    pub fn block_if_due(&self) {
        if self.is_due() {
            tracing::warn!("debug stall: this thread stops here");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }
}

/// The environment variable of the store writer's debug stall.
pub const STALL_WRITER_VAR: &str = "EDGESYNC_DEBUG_STALL_WRITER_AFTER_MS";
/// The environment variable of the link's debug stall.
pub const STALL_LINK_VAR: &str = "EDGESYNC_DEBUG_STALL_LINK_AFTER_MS";

/// The watchdog's settings and the heartbeats of the monitored loops.
#[derive(Debug, Clone)]
pub struct Health {
    /// `$WATCHDOG_USEC`: systemd kills the agent when no ping came within it.
    pub watchdog: Option<Duration>,
    /// The link's heartbeat (for [`crate::link::LinkSettings::heartbeat`]); none without a
    /// watchdog.
    pub link: Option<Heartbeat>,
    writer: Option<Heartbeat>,
}

impl Health {
    /// No watchdog: nothing is monitored, no timers run.
    pub fn off() -> Health {
        Health {
            watchdog: None,
            link: None,
            writer: None,
        }
    }

    /// Monitoring for a watchdog of `interval` (none: [`Health::off`]).
    pub fn new(interval: Option<Duration>) -> Health {
        let Some(interval) = interval else {
            return Health::off();
        };
        let pulse = pulse_for(interval);
        Health {
            watchdog: Some(interval),
            link: Some(Heartbeat::with_stall(
                "MQTT link",
                pulse,
                DebugStall::from_env(STALL_LINK_VAR),
            )),
            writer: Some(Heartbeat::new("store writer", pulse)),
        }
    }

    /// From `$WATCHDOG_USEC`/`$WATCHDOG_PID`.
    pub fn from_env() -> Health {
        Health::new(watchdog_from_env())
    }

    /// The store writer's heartbeat; none without a watchdog.
    pub fn writer(&self) -> Option<&Heartbeat> {
        self.writer.as_ref()
    }

    /// How often pings are due: half the watchdog interval.
    pub fn ping_every(&self) -> Option<Duration> {
        self.watchdog.map(|w| w / 2)
    }

    /// The monitored loops that were silent for longer than a ping interval.
    pub fn silent(&self) -> Vec<(&'static str, Duration)> {
        let Some(limit) = self.ping_every() else {
            return Vec::new();
        };
        [&self.writer, &self.link]
            .into_iter()
            .flatten()
            .map(|h| (h.name(), h.silence()))
            .filter(|(_, s)| *s > limit)
            .collect()
    }
}

/// Idle loops beat 4 times per watchdog interval (twice per ping), at least every second.
fn pulse_for(watchdog: Duration) -> Duration {
    (watchdog / 4).clamp(Duration::from_millis(10), MAX_PULSE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_variables() {
        assert_eq!(
            parse_watchdog(Some("30000000"), None, 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_watchdog(Some("400000"), Some("7"), 7),
            Some(Duration::from_millis(400))
        );
        // Meant for another process (e.g. inherited by a child).
        assert_eq!(parse_watchdog(Some("400000"), Some("8"), 7), None);
        assert_eq!(parse_watchdog(Some("0"), None, 7), None);
        assert_eq!(parse_watchdog(Some("x"), None, 7), None);
        assert_eq!(parse_watchdog(None, Some("7"), 7), None);
    }

    #[test]
    fn pulses_fit_twice_in_a_ping() {
        assert_eq!(pulse_for(Duration::from_secs(30)), Duration::from_secs(1));
        assert_eq!(
            pulse_for(Duration::from_millis(400)),
            Duration::from_millis(100)
        );
        assert_eq!(
            pulse_for(Duration::from_millis(4)),
            Duration::from_millis(10)
        );
    }

    #[test]
    fn notifies_a_datagram_socket_also_abstract() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::to_socket(path.to_str().unwrap()).unwrap();
        assert!(n.ready("online · 0 queued"));
        let mut buf = [0u8; 256];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=online \xc2\xb7 0 queued");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("edgesync-test-{}", std::process::id());
        let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
            .unwrap();
        let n = Notifier::to_socket(&format!("@{name}")).unwrap();
        assert!(n.watchdog());
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");

        assert!(Notifier::to_socket("relative").is_err());
        assert!(!Notifier::disabled().watchdog());
    }

    #[test]
    fn silent_loops_are_named() {
        assert!(
            Health::new(Some(Duration::from_secs(60)))
                .silent()
                .is_empty()
        );
        // Pings every 200 ms: a loop silent for longer is named.
        let health = Health::new(Some(Duration::from_millis(400)));
        std::thread::sleep(Duration::from_millis(250));
        let silent: Vec<_> = health.silent().into_iter().map(|(n, _)| n).collect();
        assert_eq!(silent, ["store writer", "MQTT link"]);
        health.link.as_ref().unwrap().beat();
        let silent: Vec<_> = health.silent().into_iter().map(|(n, _)| n).collect();
        assert_eq!(silent, ["store writer"]);
        assert!(Health::off().silent().is_empty());
    }
}
