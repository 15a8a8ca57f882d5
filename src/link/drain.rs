//! Backlog drain lines for the log (docs/PROTOCOL.md §7.1): the changes queued when a
//! connection comes up are a backlog; when its drain starts, every
//! [`PROGRESS_EVERY_MS`] while it lasts, and when it is done (or cut short) one line says so.
//! Sans-IO: the driver passes the time and the store's figures, so tests use a fake clock.

use std::fmt;

use crate::model::text::{human_duration, human_rate};

/// Least time between two progress lines.
pub const PROGRESS_EVERY_MS: u64 = 10_000;

/// A line to log.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Line {
    Started { queued: u64 },
    Progress { acked: u64, left: u64, per_s: f64 },
    Done { acked: u64, ms: u64, per_s: f64 },
    Cut { acked: u64, left: u64 },
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Line::Started { queued } => write!(f, "draining the backlog: {queued} changes queued"),
            Line::Progress { acked, left, per_s } => write!(
                f,
                "draining the backlog: {acked} acked, {left} left ({})",
                human_rate(per_s)
            ),
            Line::Done { acked, ms, per_s } => write!(
                f,
                "backlog drained: {acked} changes in {} ({})",
                human_duration(ms),
                human_rate(per_s)
            ),
            Line::Cut { acked, left } => write!(
                f,
                "backlog drain cut short by the disconnect: {acked} acked, {left} left"
            ),
        }
    }
}

/// The drain of the current connection, if there is a backlog.
#[derive(Debug, Default)]
pub struct Drain(Option<Run>);

#[derive(Debug)]
struct Run {
    start_ms: u64,
    /// The store's `acked` counter at the start.
    acked0: u64,
    queued: u64,
    last_ms: u64,
}

impl Run {
    /// Acked since the start and what is left of the backlog (changes queued later are
    /// not part of it).
    fn figures(&self, depth: u64, acked: u64) -> (u64, u64) {
        let done = acked.saturating_sub(self.acked0);
        (done, self.queued.saturating_sub(done).min(depth))
    }

    fn per_s(&self, done: u64, now_ms: u64) -> f64 {
        done as f64 * 1000.0 / now_ms.saturating_sub(self.start_ms).max(1) as f64
    }
}

impl Drain {
    /// A connection came up with `depth` changes queued; `acked` is the store's counter.
    pub fn connected(&mut self, now_ms: u64, depth: u64, acked: u64) -> Option<Line> {
        self.0 = (depth > 0).then_some(Run {
            start_ms: now_ms,
            acked0: acked,
            queued: depth,
            last_ms: now_ms,
        });
        (depth > 0).then_some(Line::Started { queued: depth })
    }

    /// The queue moved: `Done` once the backlog is gone, else `Progress` at most every
    /// [`PROGRESS_EVERY_MS`].
    pub fn progress(&mut self, now_ms: u64, depth: u64, acked: u64) -> Option<Line> {
        let run = self.0.as_mut()?;
        let (done, left) = run.figures(depth, acked);
        let per_s = run.per_s(done, now_ms);
        if left == 0 {
            let ms = now_ms.saturating_sub(run.start_ms);
            self.0 = None;
            return Some(Line::Done {
                acked: done,
                ms,
                per_s,
            });
        }
        if now_ms.saturating_sub(run.last_ms) < PROGRESS_EVERY_MS {
            return None;
        }
        run.last_ms = now_ms;
        Some(Line::Progress {
            acked: done,
            left,
            per_s,
        })
    }

    /// The connection ended: a drain under way was cut short.
    pub fn disconnected(&mut self, depth: u64, acked: u64) -> Option<Line> {
        let (acked, left) = self.0.take()?.figures(depth, acked);
        Some(Line::Cut { acked, left })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backlog_is_announced_reported_every_10s_and_finished() {
        let mut d = Drain::default();
        // 1000 queued, the store had acked 50 before.
        assert_eq!(
            d.connected(0, 1000, 50),
            Some(Line::Started { queued: 1000 })
        );
        assert_eq!(d.progress(1_000, 900, 150), None, "not 10 s yet");
        assert_eq!(d.progress(9_999, 700, 350), None);
        assert_eq!(
            d.progress(10_000, 600, 450),
            Some(Line::Progress {
                acked: 400,
                left: 600,
                per_s: 40.0
            })
        );
        assert_eq!(d.progress(15_000, 500, 550), None, "10 s after the last");
        let p = d.progress(20_000, 300, 750).unwrap();
        assert_eq!(
            p.to_string(),
            "draining the backlog: 700 acked, 300 left (35.0/s)"
        );
        // New changes keep coming: the backlog is done when its 1000 are acked.
        let done = d.progress(25_000, 40, 1050).unwrap();
        assert_eq!(
            done,
            Line::Done {
                acked: 1000,
                ms: 25_000,
                per_s: 40.0
            }
        );
        assert_eq!(
            done.to_string(),
            "backlog drained: 1000 changes in 25s (40.0/s)"
        );
        assert_eq!(d.progress(40_000, 0, 1090), None, "once");
        assert_eq!(d.disconnected(0, 1090), None);
    }

    #[test]
    fn no_backlog_no_lines_and_an_empty_queue_ends_it() {
        let mut d = Drain::default();
        assert_eq!(d.connected(0, 0, 7), None);
        assert_eq!(d.progress(60_000, 0, 7), None);
        // Dropped (not acked) changes also end it: the queue is empty.
        d.connected(0, 10, 0);
        assert!(matches!(
            d.progress(5, 0, 4),
            Some(Line::Done {
                acked: 4,
                ms: 5,
                ..
            })
        ));
    }

    #[test]
    fn a_disconnect_cuts_it_short() {
        let mut d = Drain::default();
        d.connected(100, 20_000, 0);
        assert_eq!(d.progress(2_100, 15_000, 5_000), None);
        let cut = d.disconnected(15_000, 5_000).unwrap();
        assert_eq!(
            cut,
            Line::Cut {
                acked: 5_000,
                left: 15_000
            }
        );
        assert!(cut.to_string().contains("5000 acked, 15000 left"), "{cut}");
        assert_eq!(d.progress(3_000, 15_000, 5_000), None, "over");
        // The next connection starts a new one.
        assert_eq!(
            d.connected(5_000, 15_000, 5_000),
            Some(Line::Started { queued: 15_000 })
        );
    }
}
