//! Retention classes (`[[store.class]]`, issue 19): which class a key belongs to, the
//! intake filter (deadband, dedupe, heartbeat) and the eviction order of a full store, as
//! plain types; the store ([`super`]) runs them on its tables through [`EvictQueue`].
//!
//! # Eviction order
//! A full store frees room in this order, stopping as soon as there is enough:
//! 1. **expired**: the oldest change of each class with a `ttl`, while its `ts` is `ttl` or
//!    more in the past (a change queued behind a younger one of its class, i.e. with an
//!    explicit older `ts`, expires when it reaches the head of its class);
//! 2. **superseded**: an older queued value of a key that has a newer queued value, oldest
//!    first (the cloud's latest state is the same without it);
//! 3. **oldest**: the oldest change of the class with the lowest priority (among equal
//!    priorities, the class whose oldest change is oldest).
//!
//! Every step removes one change and costs a few B-tree operations: eviction is
//! O(changes evicted). Index entries of changes acknowledged meanwhile ("stale") are
//! dropped as they are met, once each.

use crate::config::{DEFAULT_CLASS_PRIORITY, StoreClass};

/// Why a change left (or never entered) the queue, per class (status `classes`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClassCounters {
    /// Evicted: older than the class's `ttl`.
    pub expired: u64,
    /// Evicted: a newer value of its key was queued.
    pub superseded: u64,
    /// Evicted: the oldest of the lowest-priority class.
    pub oldest: u64,
    /// Not queued: within `deadband` of the key's last queued value.
    pub deadband: u64,
    /// Not queued: equal to the key's last queued value.
    pub dedupe: u64,
    /// Queued although a filter would have held it back: `max_interval` had passed.
    pub heartbeat: u64,
}

/// One class as the status shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClassStats {
    pub name: String,
    pub priority: u8,
    #[serde(flatten)]
    pub counters: ClassCounters,
}

/// The classes of a store: those configured, then the default class (index `len`).
#[derive(Debug, Clone, Default)]
pub struct Classes {
    rules: Vec<StoreClass>,
}

/// Index of a class within [`Classes`].
pub type ClassId = u8;

/// The name of the class of keys no `[[store.class]]` matches.
pub const DEFAULT_CLASS: &str = "default";

impl Classes {
    /// `None` when no class is configured: the store then keeps no class index at all.
    pub fn new(rules: &[StoreClass]) -> Option<Classes> {
        (!rules.is_empty()).then(|| Classes {
            rules: rules.to_vec(),
        })
    }

    /// Configured classes plus the default one.
    pub fn count(&self) -> usize {
        self.rules.len() + 1
    }

    /// The first class whose glob matches `key`, else the default class.
    pub fn class_of(&self, key: &str) -> ClassId {
        let i = self.rules.iter().position(|r| r.keys.matches(key));
        i.unwrap_or(self.rules.len()) as ClassId
    }

    fn rule(&self, c: ClassId) -> Option<&StoreClass> {
        self.rules.get(usize::from(c))
    }

    pub fn name(&self, c: ClassId) -> &str {
        self.rule(c).map_or(DEFAULT_CLASS, |r| r.name.as_str())
    }

    pub fn priority(&self, c: ClassId) -> u8 {
        self.rule(c).map_or(DEFAULT_CLASS_PRIORITY, |r| r.priority)
    }

    fn ttl_ms(&self, c: ClassId) -> Option<u64> {
        self.rule(c)?.ttl.map(crate::model::change::duration_ms)
    }

    /// Whether class `c` filters at intake (deadband or dedupe).
    pub fn filters(&self, c: ClassId) -> bool {
        self.rule(c)
            .is_some_and(|r| r.dedupe || r.deadband.is_some())
    }

    /// Whether any class filters: only then does an append read the last queued values.
    pub fn any_filter(&self) -> bool {
        (0..self.count() as ClassId).any(|c| self.filters(c))
    }

    /// What to do with a change of class `c` (`value`: CBOR, stamped `ts`) given its key's
    /// last queued value.
    pub fn intake(&self, c: ClassId, last: Option<Last<'_>>, value: &[u8], ts: u64) -> Intake {
        let (Some(rule), Some(last)) = (self.rule(c), last) else {
            return Intake::Queue;
        };
        let verdict = if rule.dedupe && value == last.value {
            Intake::Dedupe
        } else if let (Some(band), Some(a), Some(b)) =
            (rule.deadband, cbor_number(value), cbor_number(last.value))
            && (a - b).abs() <= band
        {
            Intake::Deadband
        } else {
            return Intake::Queue;
        };
        let due = rule
            .max_interval
            .is_some_and(|m| ts.saturating_sub(last.ts) >= crate::model::change::duration_ms(m));
        if due { Intake::Heartbeat } else { verdict }
    }

    /// A fingerprint of the classes' order and globs: the class index on disk is rebuilt
    /// when it changes (FNV-1a; never 0).
    pub fn layout(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for r in &self.rules {
            for b in r.keys.as_str().bytes().chain([0]) {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
        }
        h.max(1)
    }
}

/// A key's last queued value: the `reported` row (it stays after the change was sent and
/// acknowledged, so the filter compares with what the cloud has).
#[derive(Debug, Clone, Copy)]
pub struct Last<'a> {
    pub ts: u64,
    pub value: &'a [u8],
}

/// The intake decision for one change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intake {
    Queue,
    /// Queued because `max_interval` passed, although a filter would have held it back.
    Heartbeat,
    Deadband,
    Dedupe,
}

impl Intake {
    pub fn queued(self) -> bool {
        matches!(self, Intake::Queue | Intake::Heartbeat)
    }

    /// Counts it in `c`.
    pub fn count(self, c: &mut ClassCounters) {
        match self {
            Intake::Queue => {}
            Intake::Heartbeat => c.heartbeat += 1,
            Intake::Deadband => c.deadband += 1,
            Intake::Dedupe => c.dedupe += 1,
        }
    }
}

/// The number a CBOR value holds (integers and floats of every width), else `None`.
pub fn cbor_number(v: &[u8]) -> Option<f64> {
    let (&head, rest) = v.split_first()?;
    let arg = |n: usize| -> Option<u64> {
        let b = rest.get(..n)?;
        Some(b.iter().fold(0u64, |a, &x| (a << 8) | u64::from(x)))
    };
    let uint = |info: u8| -> Option<u64> {
        match info {
            0..=23 => Some(u64::from(info)),
            24 => arg(1),
            25 => arg(2),
            26 => arg(4),
            27 => arg(8),
            _ => None,
        }
    };
    match (head >> 5, head & 0x1f) {
        (0, info) => uint(info).map(|n| n as f64),
        (1, info) => uint(info).map(|n| -1.0 - n as f64),
        (7, 25) => arg(2).map(|b| half(b as u16)),
        (7, 26) => arg(4).map(|b| f64::from(f32::from_bits(b as u32))),
        (7, 27) => arg(8).map(f64::from_bits),
        _ => None,
    }
}

/// IEEE half precision to f64.
fn half(h: u16) -> f64 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((h >> 10) & 0x1f);
    let frac = f64::from(h & 0x3ff);
    sign * match exp {
        0 => frac * 2f64.powi(-24),
        31 if frac == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        e => (1.0 + frac / 1024.0) * 2f64.powi(e - 15),
    }
}

/// Which steps of the order a full store may take: under `when_full = "reject"` only
/// expired changes go (a ttl says they are worthless); the rest is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allow {
    All,
    ExpiredOnly,
}

/// The queue and its class indexes, as eviction sees them.
pub trait EvictQueue {
    type Error;
    /// The oldest entry of class `c`'s index: `(seq, ts)` (possibly stale).
    fn class_first(&mut self, c: ClassId) -> Result<Option<(u64, u64)>, Self::Error>;
    /// The oldest entry of the superseded index: `(seq, class)` (possibly stale).
    fn superseded_first(&mut self) -> Result<Option<(u64, ClassId)>, Self::Error>;
    /// Removes change `seq` of class `c` from the queue and from every index; returns its
    /// accounted bytes, or `None` if it was no longer queued (its index entries go).
    fn remove(&mut self, seq: u64, c: ClassId) -> Result<Option<u64>, Self::Error>;
}

/// Evicts in the order of the module docs until `freed >= need` or nothing is left to
/// take; counts each change in `counters[class]`. Returns `(changes, bytes)` evicted.
pub fn evict<Q: EvictQueue>(
    q: &mut Q,
    classes: &Classes,
    now: u64,
    need: u64,
    allow: Allow,
    counters: &mut [ClassCounters],
) -> Result<(u64, u64), Q::Error> {
    let n = classes.count() as ClassId;
    let (mut changes, mut freed) = (0u64, 0u64);
    // 1. Expired, class by class; a class is done once its head is young.
    for c in 0..n {
        let Some(ttl) = classes.ttl_ms(c) else {
            continue;
        };
        while freed < need {
            match q.class_first(c)? {
                Some((seq, ts)) if ts.saturating_add(ttl) <= now => {
                    let got = q.remove(seq, c)?;
                    tally(
                        got,
                        &mut changes,
                        &mut freed,
                        &mut counters[usize::from(c)].expired,
                    );
                }
                _ => break,
            }
        }
    }
    if allow == Allow::ExpiredOnly {
        return Ok((changes, freed));
    }
    // 2. Superseded, oldest first.
    while freed < need {
        let Some((seq, c)) = q.superseded_first()? else {
            break;
        };
        let got = q.remove(seq, c)?;
        let i = usize::from(c).min(counters.len() - 1);
        tally(got, &mut changes, &mut freed, &mut counters[i].superseded);
    }
    // 3. The oldest of the lowest priority.
    while freed < need {
        let mut best: Option<(u8, u64, ClassId)> = None;
        for c in 0..n {
            if let Some((seq, _)) = q.class_first(c)? {
                let k = (classes.priority(c), seq, c);
                if best.is_none_or(|b| k < b) {
                    best = Some(k);
                }
            }
        }
        let Some((_, seq, c)) = best else {
            break;
        };
        let got = q.remove(seq, c)?;
        tally(
            got,
            &mut changes,
            &mut freed,
            &mut counters[usize::from(c)].oldest,
        );
    }
    Ok((changes, freed))
}

/// Counts an eviction (`None`: a stale index entry, nothing evicted).
fn tally(got: Option<u64>, changes: &mut u64, freed: &mut u64, count: &mut u64) {
    if let Some(b) = got {
        *changes += 1;
        *freed += b;
        *count += 1;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::glob::KeyGlob;
    use std::collections::BTreeMap;
    use std::time::Duration;

    fn class(name: &str, keys: &str, priority: u8) -> StoreClass {
        StoreClass {
            name: name.into(),
            keys: KeyGlob::new(keys).unwrap(),
            priority,
            ttl: None,
            deadband: None,
            dedupe: false,
            max_interval: None,
        }
    }

    fn cbor(v: serde_json::Value) -> Vec<u8> {
        crate::model::change::encode_value("k", &v).unwrap()
    }

    #[test]
    fn the_first_matching_glob_wins_and_other_keys_are_default() {
        let c = Classes::new(&[class("a", "temp.*", 10), class("b", "*", 90)]).unwrap();
        assert_eq!(c.class_of("temp.1"), 0);
        assert_eq!(c.class_of("door"), 1);
        let c = Classes::new(&[class("a", "temp.*", 10)]).unwrap();
        assert_eq!(c.class_of("door"), 1);
        assert_eq!(c.name(1), "default");
        assert_eq!(c.priority(1), DEFAULT_CLASS_PRIORITY);
        assert!(Classes::new(&[]).is_none());
    }

    #[test]
    fn numbers_of_every_cbor_width_decode() {
        for x in [
            0.0, 1.0, 23.0, 24.0, 255.0, 65536.0, -1.0, -500.0, 21.5, 0.1, 1e300,
        ] {
            assert_eq!(cbor_number(&cbor(serde_json::json!(x))), Some(x), "{x}");
        }
        assert_eq!(
            cbor_number(&cbor(serde_json::json!(u64::MAX))),
            Some(u64::MAX as f64)
        );
        assert_eq!(half(0x3c00), 1.0);
        assert_eq!(half(0xc000), -2.0);
        assert_eq!(half(0x3555), 0.333_251_953_125);
        assert_eq!(cbor_number(&cbor(serde_json::json!("21"))), None);
        assert_eq!(cbor_number(&cbor(serde_json::json!(null))), None);
        assert_eq!(cbor_number(&[]), None);
        assert_eq!(cbor_number(&[0x1b, 1]), None);
    }

    #[test]
    fn deadband_dedupe_and_heartbeat_decide_against_the_last_queued_value() {
        let mut t = class("t", "t.*", 50);
        t.deadband = Some(0.5);
        t.max_interval = Some(Duration::from_secs(60));
        let mut s = class("s", "s.*", 50);
        s.dedupe = true;
        let c = Classes::new(&[t, s]).unwrap();
        let last_v = cbor(serde_json::json!(20.0));
        let last = Some(Last {
            ts: 1_000,
            value: &last_v,
        });
        let v = |x: serde_json::Value| cbor(x);
        // Deadband: inclusive, both ways; numbers of other widths compare as numbers.
        assert_eq!(
            c.intake(0, last, &v(serde_json::json!(20.5)), 2_000),
            Intake::Deadband
        );
        assert_eq!(
            c.intake(0, last, &v(serde_json::json!(19.5)), 2_000),
            Intake::Deadband
        );
        assert_eq!(
            c.intake(0, last, &v(serde_json::json!(20)), 2_000),
            Intake::Deadband
        );
        assert_eq!(
            c.intake(0, last, &v(serde_json::json!(20.6)), 2_000),
            Intake::Queue
        );
        // Not numbers: always queued (no dedupe in this class).
        assert_eq!(
            c.intake(0, last, &v(serde_json::json!("x")), 2_000),
            Intake::Queue
        );
        // No last value: queued.
        assert_eq!(
            c.intake(0, None, &v(serde_json::json!(20)), 2_000),
            Intake::Queue
        );
        // max_interval after the last queued ts: a heartbeat.
        assert_eq!(
            c.intake(0, last, &v(serde_json::json!(20.1)), 61_000),
            Intake::Heartbeat
        );
        assert_eq!(
            c.intake(0, last, &v(serde_json::json!(20.1)), 60_999),
            Intake::Deadband
        );
        // Dedupe: identical values only; no max_interval: never forced.
        let on = v(serde_json::json!({"on": true}));
        let last = Some(Last { ts: 0, value: &on });
        assert_eq!(c.intake(1, last, &on, u64::MAX), Intake::Dedupe);
        assert_eq!(
            c.intake(1, last, &v(serde_json::json!({"on": false})), 1),
            Intake::Queue
        );
        // The default class never filters.
        assert_eq!(c.intake(2, last, &on, 1), Intake::Queue);
        assert!(Intake::Heartbeat.queued() && !Intake::Dedupe.queued());
    }

    /// A queue in memory: seq → (class, ts, bytes, key); indexes as the store keeps them.
    #[derive(Default)]
    struct Mem {
        queue: BTreeMap<u64, (ClassId, u64, u64)>,
        by_class: BTreeMap<(ClassId, u64), u64>,
        superseded: BTreeMap<u64, ClassId>,
        ops: u64,
    }

    impl Mem {
        fn push(&mut self, seq: u64, c: ClassId, ts: u64, supersedes: Option<u64>) {
            self.queue.insert(seq, (c, ts, 10));
            self.by_class.insert((c, seq), ts);
            if let Some(s) = supersedes {
                self.superseded.insert(s, c);
            }
        }
    }

    impl EvictQueue for Mem {
        type Error = ();
        fn class_first(&mut self, c: ClassId) -> Result<Option<(u64, u64)>, ()> {
            self.ops += 1;
            Ok(self
                .by_class
                .range((c, 0)..=(c, u64::MAX))
                .next()
                .map(|(&(_, s), &ts)| (s, ts)))
        }
        fn superseded_first(&mut self) -> Result<Option<(u64, ClassId)>, ()> {
            self.ops += 1;
            Ok(self.superseded.iter().next().map(|(&s, &c)| (s, c)))
        }
        fn remove(&mut self, seq: u64, c: ClassId) -> Result<Option<u64>, ()> {
            self.ops += 1;
            self.by_class.remove(&(c, seq));
            self.superseded.remove(&seq);
            Ok(self.queue.remove(&seq).map(|e| e.2))
        }
    }

    fn order(m: &mut Mem, c: &Classes, now: u64, n: u64, allow: Allow) -> Vec<u64> {
        let before: Vec<u64> = m.queue.keys().copied().collect();
        let mut counters = vec![ClassCounters::default(); c.count()];
        evict(m, c, now, n * 10, allow, &mut counters).unwrap();
        before
            .into_iter()
            .filter(|s| !m.queue.contains_key(s))
            .collect()
    }

    #[test]
    fn a_full_store_evicts_expired_then_superseded_then_the_oldest_of_the_lowest_class() {
        let mut low = class("low", "low.*", 10);
        low.ttl = Some(Duration::from_secs(1));
        let high = class("high", "high.*", 90);
        let c = Classes::new(&[low, high]).unwrap();
        // seq: class, ts. Default class (2) has priority 50.
        let mut m = Mem::default();
        m.push(1, 1, 0, None); // high, old: never expires (no ttl)
        m.push(2, 0, 500, None); // low, expired at now = 2000
        m.push(3, 2, 0, None); // default
        m.push(4, 0, 1_500, None); // low, young
        m.push(5, 1, 0, Some(1)); // high, supersedes 1
        m.push(6, 2, 0, Some(3)); // default, supersedes 3
        m.push(7, 0, 1_900, None); // low
        let mut counters = vec![ClassCounters::default(); 3];
        let (n, bytes) = evict(&mut m, &c, 2_000, 45, Allow::All, &mut counters).unwrap();
        assert_eq!((n, bytes), (5, 50));
        // 2 expired; 1, 3 superseded; then low (10) before default (50) before high (90).
        assert_eq!(m.queue.keys().copied().collect::<Vec<_>>(), vec![5, 6]);
        assert_eq!(counters[0].expired, 1);
        assert_eq!(counters[1].superseded + counters[2].superseded, 2);
        assert_eq!(counters[0].oldest, 2);
        // Next: the default class, then high.
        assert_eq!(order(&mut m, &c, 2_000, 1, Allow::All), vec![6]);
        assert_eq!(order(&mut m, &c, 2_000, 1, Allow::All), vec![5]);
        assert_eq!(order(&mut m, &c, 2_000, 1, Allow::All), Vec::<u64>::new());
    }

    #[test]
    fn equal_priorities_take_the_oldest_and_reject_takes_only_expired() {
        let mut a = class("a", "a.*", 50);
        a.ttl = Some(Duration::from_secs(10));
        let c = Classes::new(&[a]).unwrap();
        let mut m = Mem::default();
        m.push(1, 1, 0, None);
        m.push(2, 0, 0, None);
        m.push(3, 0, 50_000, Some(2));
        // Under reject: only the expired one (2), although 20 bytes were asked for.
        assert_eq!(order(&mut m, &c, 20_000, 2, Allow::ExpiredOnly), vec![2]);
        assert_eq!(
            order(&mut m, &c, 20_000, 1, Allow::ExpiredOnly),
            Vec::<u64>::new()
        );
        // Same priority: the older head (1, default) first.
        assert_eq!(order(&mut m, &c, 20_000, 1, Allow::All), vec![1]);
    }

    #[test]
    fn stale_entries_are_skipped_once_and_eviction_is_linear_in_what_it_takes() {
        let c = Classes::new(&[class("a", "a.*", 10)]).unwrap();
        let mut m = Mem::default();
        for seq in 1..=10_000 {
            m.push(seq, (seq % 2) as ClassId, 0, (seq > 2).then(|| seq - 2));
        }
        // Acknowledged 1..=100: gone from the queue, their index entries stale.
        for seq in 1..=100 {
            m.queue.remove(&seq);
        }
        m.ops = 0;
        let mut counters = vec![ClassCounters::default(); 2];
        let (n, _) = evict(&mut m, &c, 0, 50 * 10, Allow::All, &mut counters).unwrap();
        assert_eq!(n, 50);
        // 100 stale superseded entries met once each, then 50 taken: no scan of the queue.
        assert!(m.ops < 2 * (100 + 50) + 10, "{} operations", m.ops);
        assert_eq!(counters[0].superseded + counters[1].superseded, 50);
    }
}
