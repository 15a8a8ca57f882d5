//! The supervisor of the daemon's systemd integration: the one-line status (`STATUS=`) it
//! keeps current and the watchdog pings it sends only while the store writer and the link
//! make progress (the protocol itself is [`crate::sys::notify`]).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::health::status::{LinkFigures, LinkState, StatusBoard};
use crate::store::{Outbox, QueueStats};
use crate::sys::notify::{Health, Notifier, one_line};

/// How often the status line is recomputed (and sent if it changed).
pub const STATUS_EVERY: Duration = Duration::from_secs(2);
/// Longest error text in the status line.
const STATUS_ERROR_CHARS: usize = 100;

/// The one-line status: `online · 0 queued · desired v3`, plus the last error while not
/// online and the loops the watchdog waits for.
pub fn summary(
    link: &LinkFigures,
    queue: &QueueStats,
    desired: Option<u64>,
    silent: &[(&'static str, Duration)],
) -> String {
    let state = match link.state {
        LinkState::Online => "online",
        LinkState::Connecting => "connecting",
        LinkState::Offline => "offline",
    };
    let mut s = format!("{state} · {} queued", queue.depth);
    match desired {
        Some(v) => s.push_str(&format!(" · desired v{v}")),
        None => s.push_str(" · no desired state"),
    }
    if link.state != LinkState::Online
        && let Some(e) = &link.last_error
    {
        let mut e: String = e.chars().take(STATUS_ERROR_CHARS).collect();
        if e.len() < link.last_error.as_ref().map_or(0, String::len) {
            e.push('…');
        }
        s.push_str(&format!(" · last error: {e}"));
    }
    for (name, silence) in silent {
        s.push_str(&format!(
            " · watchdog: {name} not responding for {:.0?}",
            silence
        ));
    }
    one_line(&s)
}

/// The status line now (one short read transaction for the desired version).
async fn current_summary(outbox: &Outbox, board: &StatusBoard, health: &Health) -> String {
    let reader = outbox.clone();
    let desired = tokio::task::spawn_blocking(move || {
        crate::store::desired::applied_version(&reader)
            .ok()
            .flatten()
    })
    .await
    .ok()
    .flatten();
    summary(
        &board.snapshot(),
        &outbox.stats(),
        desired,
        &health.silent(),
    )
}

/// Sends `READY=1` with the first status line.
pub async fn ready(notifier: &Notifier, outbox: &Outbox, board: &StatusBoard, health: &Health) {
    if notifier.is_enabled() {
        let line = current_summary(outbox, board, health).await;
        notifier.ready(&line);
    }
    if let Some(w) = health.watchdog {
        tracing::info!(
            "systemd watchdog: {w:?}; pinging every {:?} while the store writer and the link make progress",
            w / 2
        );
    }
}

/// Runs until `stop`: keeps the status line current and pings the watchdog while every
/// monitored loop is alive (see the module docs). Start it after [`ready`].
pub async fn supervise(
    notifier: Notifier,
    health: Health,
    outbox: Outbox,
    board: StatusBoard,
    stop: CancellationToken,
) {
    if !notifier.is_enabled() && health.watchdog.is_none() {
        return;
    }
    // The store writer's probe: round trips, one after the other, each a pulse apart.
    let probe = health.writer().cloned().map(|beat| {
        let outbox = outbox.clone();
        tokio::spawn(async move {
            while outbox.heartbeat().await.is_ok() {
                beat.beat();
                tokio::time::sleep(beat.pulse()).await;
            }
        })
    });
    let mut status_every = tokio::time::interval(STATUS_EVERY);
    status_every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ping_every = health.ping_every().map(|p| {
        let mut i = tokio::time::interval(p);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    let mut last_status = String::new();
    let mut was_silent: Vec<&'static str> = Vec::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = status_every.tick() => {
                let line = current_summary(&outbox, &board, &health).await;
                if line != last_status && notifier.status(&line) {
                    last_status = line;
                }
            }
            _ = tick(&mut ping_every) => {
                let silent = health.silent();
                let names: Vec<&'static str> = silent.iter().map(|(n, _)| *n).collect();
                if silent.is_empty() {
                    notifier.watchdog();
                    if !was_silent.is_empty() {
                        tracing::info!("watchdog: every monitored loop responds again; pinging");
                    }
                } else if names != was_silent {
                    let what: Vec<String> = silent.iter().map(|(n, s)| format!("{n} (silent for {s:.1?})")).collect();
                    tracing::error!(
                        "watchdog: not pinging systemd: {} not responding; systemd restarts the agent if this lasts",
                        what.join(", ")
                    );
                    let line = current_summary(&outbox, &board, &health).await;
                    if notifier.status(&line) {
                        last_status = line;
                    }
                }
                was_silent = names;
            }
        }
    }
    if let Some(p) = probe {
        p.abort();
    }
}

async fn tick(i: &mut Option<tokio::time::Interval>) {
    match i {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_lines() {
        let mut link = LinkFigures {
            state: LinkState::Online,
            ..LinkFigures::default()
        };
        let queue = QueueStats::default();
        assert_eq!(
            summary(&link, &queue, Some(3), &[]),
            "online · 0 queued · desired v3"
        );
        link.state = LinkState::Offline;
        link.last_error = Some("connection refused\nsecond line".into());
        assert_eq!(
            summary(
                &link,
                &queue,
                None,
                &[("store writer", Duration::from_secs(20))]
            ),
            "offline · 0 queued · no desired state · last error: connection refused second line · watchdog: store writer not responding for 20s"
        );
        link.last_error = Some("x".repeat(300));
        let s = summary(&link, &queue, None, &[]);
        assert!(s.ends_with("x…"), "{s}");
        assert!(s.chars().count() < 200, "{s}");
    }
}
