//! Reconnect backoff: exponential with full jitter (the delay is uniform in
//! `[0, min(max, initial × 2^attempt)]`), so a fleet that lost its broker does not return as
//! a storm; reset once a connection has lasted `reset_after`. Without jitter
//! (`mqtt.reconnect_jitter = "none"`, for measuring storms) the delay is the ceiling itself.
//! Sans-IO: the random source is passed in.

use std::time::Duration;

use crate::config::ReconnectJitter;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    reset_after: Duration,
    attempt: u32,
    jitter: ReconnectJitter,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration, reset_after: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
            reset_after,
            attempt: 0,
            jitter: ReconnectJitter::Full,
        }
    }

    /// New limits (a reloaded config: the keys are live); the attempt count stays.
    pub fn set_limits(&mut self, initial: Duration, max: Duration, reset_after: Duration) {
        *self = Self {
            attempt: self.attempt,
            jitter: self.jitter,
            ..Self::new(initial, max, reset_after)
        };
    }

    /// `mqtt.reconnect_jitter` (live, like the limits).
    pub fn set_jitter(&mut self, jitter: ReconnectJitter) {
        self.jitter = jitter;
    }

    /// The ceiling of the next delay.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The delay before the next attempt; `unit` is a uniform random number in `[0, 1)`.
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        match self.jitter {
            ReconnectJitter::Full => ceiling.mul_f64(unit.clamp(0.0, 1.0)),
            ReconnectJitter::None => ceiling,
        }
    }

    /// A connection ended after lasting `connected_for`: long enough resets the backoff.
    pub fn connection_ended(&mut self, connected_for: Duration) {
        if connected_for >= self.reset_after {
            self.attempt = 0;
        }
    }
}

/// A small xorshift64* generator: jitter needs spread, not cryptographic quality.
#[derive(Debug, Clone)]
pub struct Jitter(u64);

impl Jitter {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    /// Seeded from the clock and the process id, so devices booted together still differ.
    pub fn from_entropy() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Self::new(t ^ (u64::from(std::process::id()) << 32) ^ 0x9e37_79b9_7f4a_7c15)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b() -> Backoff {
        Backoff::new(
            Duration::from_secs(1),
            Duration::from_secs(120),
            Duration::from_secs(60),
        )
    }

    #[test]
    fn ceilings_double_up_to_the_cap() {
        let mut b = b();
        let ceilings: Vec<u64> = (0..10)
            .map(|_| {
                let c = b.ceiling().as_secs();
                b.next_delay(0.5);
                c
            })
            .collect();
        assert_eq!(ceilings, vec![1, 2, 4, 8, 16, 32, 64, 120, 120, 120]);
        for _ in 0..100 {
            b.next_delay(0.9);
        }
        assert_eq!(b.ceiling(), Duration::from_secs(120), "no overflow");
    }

    #[test]
    fn delays_are_jittered_over_the_whole_range() {
        let mut j = Jitter::new(42);
        let mut delays = Vec::new();
        for _ in 0..1000 {
            let mut b = b();
            for _ in 0..7 {
                b.next_delay(j.unit());
            }
            delays.push(b.next_delay(j.unit()));
        }
        let max = Duration::from_secs(120);
        assert!(delays.iter().all(|d| *d <= max));
        let below_half = delays.iter().filter(|d| **d < max / 2).count();
        assert!((400..600).contains(&below_half), "uniform: {below_half}");
        let mut sorted = delays.clone();
        sorted.dedup();
        assert!(sorted.len() > 900, "spread, not a few fixed values");
    }

    #[test]
    fn fleet_does_not_reconnect_in_lockstep() {
        // 1000 devices lose the broker at once: their first retries spread over the ceiling.
        let first: Vec<Duration> = (0..1000u64)
            .map(|d| b().next_delay(Jitter::new(d * 7919 + 1).unit()))
            .collect();
        let in_first_100ms = first
            .iter()
            .filter(|d| **d < Duration::from_millis(100))
            .count();
        assert!(
            in_first_100ms < 200,
            "{in_first_100ms} of 1000 within 100 ms"
        );
    }

    #[test]
    fn long_connection_resets_short_one_does_not() {
        let mut b = b();
        for _ in 0..5 {
            b.next_delay(0.5);
        }
        b.connection_ended(Duration::from_secs(10));
        assert_eq!(b.ceiling(), Duration::from_secs(32));
        b.connection_ended(Duration::from_secs(60));
        assert_eq!(b.ceiling(), Duration::from_secs(1));
    }

    #[test]
    fn reloaded_limits_apply_to_the_next_delay() {
        let mut b = b();
        for _ in 0..3 {
            b.next_delay(0.5);
        }
        b.set_limits(
            Duration::from_secs(10),
            Duration::from_secs(3600),
            Duration::from_secs(60),
        );
        assert_eq!(b.ceiling(), Duration::from_secs(80), "attempts kept");
        b.set_limits(
            Duration::from_millis(100),
            Duration::from_millis(200),
            Duration::from_secs(60),
        );
        assert_eq!(b.ceiling(), Duration::from_millis(200), "capped at once");
    }

    #[test]
    fn without_jitter_the_delay_is_the_ceiling_and_a_fleet_retries_in_lockstep() {
        let mut b = b();
        b.set_jitter(ReconnectJitter::None);
        let delays: Vec<u64> = (0..9)
            .map(|i| b.next_delay(f64::from(i) / 10.0).as_secs())
            .collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 16, 32, 64, 120, 120]);
        b.set_limits(
            Duration::from_secs(2),
            Duration::from_secs(10),
            Duration::from_secs(60),
        );
        assert_eq!(b.next_delay(0.0), Duration::from_secs(10), "kept on reload");
        let first: Vec<Duration> = (0..100u64)
            .map(|d| {
                let mut b = self::b();
                b.set_jitter(ReconnectJitter::None);
                b.next_delay(Jitter::new(d * 7919 + 1).unit())
            })
            .collect();
        assert!(first.iter().all(|d| *d == Duration::from_secs(1)));
        b.set_jitter(ReconnectJitter::Full);
        assert_eq!(b.next_delay(0.0), Duration::ZERO, "full jitter again");
    }

    #[test]
    fn unit_is_in_range() {
        let mut j = Jitter::from_entropy();
        for _ in 0..10_000 {
            let u = j.unit();
            assert!((0.0..1.0).contains(&u));
        }
    }
}
