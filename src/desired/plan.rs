//! Deciding what to do with each key of a desired document, sans-IO: validation rules,
//! conflict policies. Running the decision (handlers, merge programs) is [`super::apply`].

use serde_json::Value;

use crate::config::{DesiredConfig, Policy};
use crate::model::rules::{check_value, find_rule};
use crate::store::desired::LocalChange;

/// The decision for one key.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyPlan {
    /// Refused by validation: `rejected`.
    Reject(String),
    /// The device's value stays: `conflict`.
    KeepDevice,
    /// Apply this value through the key's handler.
    Apply(Value),
    /// Run the merge program, then apply its output.
    Merge {
        device: Value,
        cloud: Value,
        argv: Vec<String>,
        timeout: std::time::Duration,
    },
}

/// Whether the device changed the key in a way the cloud had not seen when it issued the
/// document: the change is still queued, or it is later than the document's `ts`.
pub fn is_conflict(local: Option<&LocalChange>, doc_ts: Option<u64>) -> bool {
    local.is_some_and(|l| l.queued || doc_ts.is_some_and(|t| l.ts > t))
}

/// The times a conflict check may believe: a document's `ts` more than
/// `desired.max_future_ts` after its receipt is ignored (as if it had none); a local change
/// stamped more than that ahead of `now` (the clock was set back since, or a program sent a
/// bogus `ts` before intake refused them) counts as older than any document. Without this,
/// one such `ts` wins every last-write-wins check for ever.
pub fn believed(
    cfg: &DesiredConfig,
    local: Option<&LocalChange>,
    doc_ts: Option<u64>,
    received: u64,
    now: u64,
) -> (Option<LocalChange>, Option<u64>) {
    let max = crate::model::change::duration_ms(cfg.max_future_ts);
    let doc_ts = doc_ts.filter(|&t| t <= received.saturating_add(max));
    let local = local.map(|l| LocalChange {
        ts: if l.ts > now.saturating_add(max) {
            0
        } else {
            l.ts
        },
        ..l.clone()
    });
    (local, doc_ts)
}

/// Plans one key. `received` (Unix ms) stands in for a document without `ts`; `now` is the
/// time of the decision (see [`believed`]).
pub fn plan_key(
    cfg: &DesiredConfig,
    key: &str,
    value: &Result<Value, String>,
    local: Option<&LocalChange>,
    doc_ts: Option<u64>,
    received: u64,
    now: u64,
) -> KeyPlan {
    let value = match value {
        Ok(v) => v,
        Err(e) => return KeyPlan::Reject(e.clone()),
    };
    if let Err(e) = check_value(find_rule(&cfg.rules, key), cfg.unknown_keys, value) {
        return KeyPlan::Reject(e);
    }
    let (local, doc_ts) = believed(cfg, local, doc_ts, received, now);
    let local = local.as_ref();
    let Some(local) = local.filter(|_| is_conflict(local, doc_ts)) else {
        return KeyPlan::Apply(value.clone());
    };
    let policy = cfg
        .conflicts
        .iter()
        .find(|c| c.keys.matches(key))
        .map(|c| &c.policy);
    match policy {
        None | Some(Policy::CloudWins) => KeyPlan::Apply(value.clone()),
        Some(Policy::DeviceWins) => KeyPlan::KeepDevice,
        Some(Policy::LastWriteWins) => {
            if local.ts > doc_ts.unwrap_or(received) {
                KeyPlan::KeepDevice
            } else {
                KeyPlan::Apply(value.clone())
            }
        }
        Some(Policy::Merge { argv, timeout }) => KeyPlan::Merge {
            device: local.value.clone(),
            cloud: value.clone(),
            argv: argv.clone(),
            timeout: *timeout,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConflictRule;
    use crate::model::glob::KeyGlob;
    use crate::model::rules::{Rule, UnknownKeys, ValueType};
    use serde_json::json;
    use std::time::Duration;

    fn cfg(policy: Policy) -> DesiredConfig {
        DesiredConfig {
            conflicts: vec![ConflictRule {
                keys: KeyGlob("led.*".into()),
                policy,
            }],
            rules: vec![Rule {
                keys: KeyGlob("setpoint".into()),
                value_type: Some(ValueType::Number),
                min: Some(5.0),
                max: Some(30.0),
                one_of: None,
                max_length: None,
                nullable: true,
            }],
            ..DesiredConfig::default()
        }
    }

    fn local(ts: u64, queued: bool) -> LocalChange {
        LocalChange {
            value: json!("device"),
            ts,
            queued,
        }
    }

    #[test]
    fn no_local_change_applies() {
        let c = cfg(Policy::DeviceWins);
        assert_eq!(
            plan_key(&c, "led.mode", &Ok(json!("cloud")), None, Some(100), 0, 0),
            KeyPlan::Apply(json!("cloud"))
        );
    }

    #[test]
    fn conflict_needs_a_queued_or_newer_local_change() {
        assert!(!is_conflict(Some(&local(50, false)), Some(100)));
        assert!(is_conflict(Some(&local(50, true)), Some(100)));
        assert!(is_conflict(Some(&local(150, false)), Some(100)));
        assert!(!is_conflict(Some(&local(150, false)), None));
        assert!(!is_conflict(None, Some(1)));
    }

    #[test]
    fn each_policy_decides() {
        let l = local(150, false);
        let v = Ok(json!("cloud"));
        let p = |policy| plan_key(&cfg(policy), "led.mode", &v, Some(&l), Some(100), 0, 0);
        assert_eq!(p(Policy::CloudWins), KeyPlan::Apply(json!("cloud")));
        assert_eq!(p(Policy::DeviceWins), KeyPlan::KeepDevice);
        assert_eq!(p(Policy::LastWriteWins), KeyPlan::KeepDevice);
        let older = local(50, true);
        assert_eq!(
            plan_key(
                &cfg(Policy::LastWriteWins),
                "led.mode",
                &v,
                Some(&older),
                Some(100),
                0,
                0
            ),
            KeyPlan::Apply(json!("cloud")),
            "queued but older than the document: the cloud's write is later"
        );
        let argv = vec!["/bin/merge".to_owned()];
        assert_eq!(
            p(Policy::Merge {
                argv: argv.clone(),
                timeout: Duration::from_secs(1)
            }),
            KeyPlan::Merge {
                device: json!("device"),
                cloud: json!("cloud"),
                argv,
                timeout: Duration::from_secs(1)
            }
        );
        // Keys no conflict rule matches: cloud wins.
        assert_eq!(
            plan_key(
                &cfg(Policy::DeviceWins),
                "other",
                &v,
                Some(&l),
                Some(100),
                0,
                0
            ),
            KeyPlan::Apply(json!("cloud"))
        );
    }

    #[test]
    fn a_ts_from_the_future_does_not_win_for_ever() {
        let lww = cfg(Policy::LastWriteWins);
        let v = Ok(json!("cloud"));
        let now = 1_764_150_000_000;
        let hour = 3_600_000;
        // A device change stamped u64::MAX (or a clock set back since): no conflict by time,
        // and queued it loses last-write-wins.
        for queued in [false, true] {
            let bogus = local(u64::MAX, queued);
            assert_eq!(
                plan_key(&lww, "led.mode", &v, Some(&bogus), Some(now), now, now),
                KeyPlan::Apply(json!("cloud")),
                "queued {queued}"
            );
            assert_eq!(
                plan_key(&lww, "led.mode", &v, Some(&bogus), None, now, now),
                KeyPlan::Apply(json!("cloud")),
                "queued {queued}, document without ts"
            );
        }
        // Within the tolerance it is believed: later than the document, the device wins.
        let ahead = local(now + hour - 1, false);
        assert_eq!(
            plan_key(&lww, "led.mode", &v, Some(&ahead), Some(now), now, now),
            KeyPlan::KeepDevice
        );
        // Just beyond it: not believed.
        let beyond = local(now + hour + 1, false);
        assert_eq!(
            plan_key(&lww, "led.mode", &v, Some(&beyond), Some(now), now, now),
            KeyPlan::Apply(json!("cloud"))
        );
        // A document's ts far ahead of its receipt is ignored: a later device change (still
        // queued) wins last-write-wins against its receipt time.
        let recent = local(now + 5, true);
        assert_eq!(
            plan_key(
                &lww,
                "led.mode",
                &v,
                Some(&recent),
                Some(u64::MAX),
                now,
                now + 10
            ),
            KeyPlan::KeepDevice
        );
        let (_, doc_ts) = believed(&lww, None, Some(now + hour), now, now);
        assert_eq!(doc_ts, Some(now + hour), "within the tolerance: believed");
        let (_, doc_ts) = believed(&lww, None, Some(now + hour + 1), now, now);
        assert_eq!(doc_ts, None);
    }

    #[test]
    fn validation_comes_first() {
        let c = cfg(Policy::CloudWins);
        assert!(matches!(
            plan_key(&c, "setpoint", &Ok(json!(40)), None, None, 0, 0),
            KeyPlan::Reject(_)
        ));
        assert!(matches!(
            plan_key(&c, "x", &Err("bad".into()), None, None, 0, 0),
            KeyPlan::Reject(e) if e == "bad"
        ));
        let strict = DesiredConfig {
            unknown_keys: UnknownKeys::Reject,
            ..cfg(Policy::CloudWins)
        };
        assert!(matches!(
            plan_key(&strict, "x", &Ok(json!(1)), None, None, 0, 0),
            KeyPlan::Reject(_)
        ));
    }
}
