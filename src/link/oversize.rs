//! Messages over the incoming packet limit (issue 13 item 4).
//!
//! rumqttc reads a whole packet into memory, so it refuses one over the limit by its fixed
//! header and drops the connection; it does not say which topic the message was on. A
//! message queued in the broker session comes right after CONNACK, before any SUBACK; a
//! retained one comes right after the SUBACK of the subscription that matches it. So the
//! filter whose SUBACK came last is the suspect (the agent subscribes commands first,
//! desired last, so a live oversize message is blamed on the desired topic, where large
//! documents belong).
//!
//! - First time: reconnect with a clean session (drops a message queued for us).
//! - The same filter again: a retained message (or a broker that re-delivers): that filter
//!   is not subscribed for [`HOLD_INITIAL`], doubling up to [`HOLD_MAX`]; uplink and the
//!   other filter work meanwhile. A desired document is refused with a `rejected` result.
//! - Before any SUBACK twice in a row (a broker that re-delivers whatever the session):
//!   nothing is subscribed for the hold period.

use std::time::{Duration, Instant};

/// How long a filter is not subscribed after it delivered an oversize message twice.
pub const HOLD_INITIAL: Duration = Duration::from_secs(60);
/// The longest hold (it doubles with each repeat).
pub const HOLD_MAX: Duration = Duration::from_secs(3600);

/// The agent's subscriptions, in the order they are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Commands,
    Desired,
}

impl Filter {
    pub const ALL: [Filter; 2] = [Filter::Commands, Filter::Desired];

    fn index(self) -> usize {
        match self {
            Filter::Commands => 0,
            Filter::Desired => 1,
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Hold {
    /// Oversize messages blamed on this filter since it last worked.
    strikes: u32,
    until: Option<Instant>,
}

/// What to do after an oversize message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The filter blamed, if any (`None`: it came before any SUBACK).
    pub suspect: Option<Filter>,
    /// Filters not subscribed from now on, and for how long.
    pub held: Vec<Filter>,
    pub hold: Option<Duration>,
}

/// Oversize messages across connections.
#[derive(Debug, Default)]
pub struct Guard {
    holds: [Hold; 2],
    /// Oversize messages before any SUBACK, in a row.
    unattributed: u32,
}

impl Guard {
    /// The filters to subscribe on a connection made at `now`, in order.
    pub fn filters(&self, now: Instant) -> Vec<Filter> {
        Filter::ALL
            .into_iter()
            .filter(|f| self.holds[f.index()].until.is_none_or(|t| now >= t))
            .collect()
    }

    /// Whether any filter is held at `now`.
    pub fn holding(&self, now: Instant) -> bool {
        self.filters(now).len() < Filter::ALL.len()
    }

    /// An oversize message ended a connection after the SUBACKs of `acked` (in order).
    pub fn oversize(&mut self, acked: &[Filter], now: Instant) -> Verdict {
        let Some(&suspect) = acked.last() else {
            self.unattributed += 1;
            if self.unattributed < 2 {
                return Verdict {
                    suspect: None,
                    held: Vec::new(),
                    hold: None,
                };
            }
            let mut hold = Duration::ZERO;
            for f in Filter::ALL {
                hold = hold.max(self.strike(f, now));
            }
            return Verdict {
                suspect: None,
                held: Filter::ALL.to_vec(),
                hold: Some(hold),
            };
        };
        self.unattributed = 0;
        let h = &mut self.holds[suspect.index()];
        h.strikes += 1;
        if h.strikes < 2 {
            return Verdict {
                suspect: Some(suspect),
                held: Vec::new(),
                hold: None,
            };
        }
        let hold = self.strike(suspect, now);
        Verdict {
            suspect: Some(suspect),
            held: vec![suspect],
            hold: Some(hold),
        }
    }

    /// Holds `f` for its next period; returns the period.
    fn strike(&mut self, f: Filter, now: Instant) -> Duration {
        let h = &mut self.holds[f.index()];
        h.strikes = h.strikes.max(2);
        let doublings = (h.strikes - 2).min(16);
        let hold = HOLD_INITIAL.saturating_mul(1 << doublings).min(HOLD_MAX);
        h.until = Some(now + hold);
        hold
    }

    /// A connection ended otherwise after the SUBACKs of `acked`: those filters work.
    pub fn ended(&mut self, acked: &[Filter]) {
        for f in acked {
            self.holds[f.index()] = Hold::default();
        }
        if !acked.is_empty() {
            self.unattributed = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retained_oversize_desired_document_holds_only_the_desired_filter() {
        let mut g = Guard::default();
        let t0 = Instant::now();
        let both = [Filter::Commands, Filter::Desired];
        assert_eq!(g.filters(t0), both);
        // Live first: no hold yet.
        let v = g.oversize(&both, t0);
        assert_eq!((v.suspect, v.hold), (Some(Filter::Desired), None));
        assert_eq!(g.filters(t0), both);
        // Again after subscribing: held.
        let v = g.oversize(&both, t0);
        assert_eq!(v.held, [Filter::Desired]);
        assert_eq!(v.hold, Some(HOLD_INITIAL));
        assert_eq!(g.filters(t0), [Filter::Commands]);
        assert!(g.holding(t0));
        // Connections without desired work: it stays held until the period ends.
        g.ended(&[Filter::Commands]);
        assert_eq!(g.filters(t0 + HOLD_INITIAL / 2), [Filter::Commands]);
        assert_eq!(g.filters(t0 + HOLD_INITIAL), both);
        // Still there after the hold: twice as long.
        let v = g.oversize(&both, t0 + HOLD_INITIAL);
        assert_eq!(v.hold, Some(HOLD_INITIAL * 2));
        for _ in 0..20 {
            g.oversize(&both, t0);
        }
        let v = g.oversize(&both, t0);
        assert_eq!(v.hold, Some(HOLD_MAX));
        // Cleared: it works again, strikes forgotten.
        g.ended(&both);
        let v = g.oversize(&both, t0);
        assert_eq!(v.hold, None);
    }

    #[test]
    fn oversize_before_any_suback_twice_holds_everything() {
        let mut g = Guard::default();
        let t0 = Instant::now();
        assert_eq!(g.oversize(&[], t0).hold, None);
        let v = g.oversize(&[], t0);
        assert_eq!(v.held, Filter::ALL);
        assert_eq!(v.hold, Some(HOLD_INITIAL));
        assert!(g.filters(t0).is_empty());
        // A blame on the commands after the first SUBACK.
        let mut g = Guard::default();
        assert_eq!(
            g.oversize(&[Filter::Commands], t0).suspect,
            Some(Filter::Commands)
        );
    }
}
