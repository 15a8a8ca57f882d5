//! Validation of desired values against `[[desired.rule]]`.
//!
//! [`find_rule`] picks the first rule whose glob matches a key; [`check_value`] checks one
//! value against it and says precisely why it fails. Both are pure: the caller decides what a
//! failure means (the key is `rejected`, the rest of the document still applies).
//!
//! # Semantics
//!
//! - `null` removes a key. It is allowed when the rule is `nullable` (the default) and then
//!   no other check applies; a non-nullable rule refuses it. A key that no rule matches
//!   follows `desired.unknown_keys`: `accept` lets every value (and `null`) through,
//!   `reject` refuses every value, `null` included.
//! - `type`: `bool`, `string`, `object`, `array` are the JSON types. `number` is any JSON
//!   number. `integer` is a number without a fractional part: what serde_json holds as an
//!   `i64`/`u64`, **or** a float whose fractional part is zero (`3.0`). Floats are accepted
//!   because a CBOR encoder or a JSON library may write a whole number as a float; the value
//!   is passed on as it came.
//! - `min`/`max` (inclusive) apply to numbers only: a rule with bounds and no `type` refuses
//!   a value that is not a number. Comparisons are in `f64`, so integers beyond 2^53 are
//!   compared approximately.
//! - `enum`: the value must equal one of the listed values, compared as JSON with numbers
//!   compared by value (`3` equals `3.0`).
//! - `max_length`: characters of a string, items of an array, members of an object; it does
//!   not apply to booleans and numbers.
//!
//! Checks run in this order and the first failure is reported: null, type, bounds, enum,
//! length.

use serde_json::{Number, Value};

use super::glob::KeyGlob;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownKeys {
    Accept,
    Reject,
}

/// `[[desired.rule]]`: what values a key accepts.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub keys: KeyGlob,
    /// Required JSON type, if any.
    pub value_type: Option<ValueType>,
    /// Inclusive bounds for numbers.
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// Allowed values (compared as JSON).
    pub one_of: Option<Vec<serde_json::Value>>,
    /// Longest string (in characters), array (items) or object (members).
    pub max_length: Option<usize>,
    /// Whether `null` (remove the key) is allowed, default true.
    pub nullable: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    Bool,
    Integer,
    Number,
    String,
    Object,
    Array,
}

/// Longest rendering of a value or a list inside a message.
const SHOWN_MAX: usize = 80;

/// The first rule (in file order) whose `keys` glob matches `key`.
pub fn find_rule<'a>(rules: &'a [Rule], key: &str) -> Option<&'a Rule> {
    rules.iter().find(|rule| rule.keys.matches(key))
}

/// [`find_rule`] then [`check_value`].
#[cfg(test)]
pub fn check_key(
    rules: &[Rule],
    unknown: UnknownKeys,
    key: &str,
    value: &Value,
) -> Result<(), String> {
    check_value(find_rule(rules, key), unknown, value)
}

/// Check `value` against `rule` (the rule [`find_rule`] found for its key, if any).
///
/// On failure returns the reason, e.g. `expected a number, found a string`,
/// `20.5 is above the maximum 20`, `"fast" is not one of ["eco","boost"]`,
/// `string of 80 characters is longer than 64`.
pub fn check_value(rule: Option<&Rule>, unknown: UnknownKeys, value: &Value) -> Result<(), String> {
    let Some(rule) = rule else {
        return match unknown {
            UnknownKeys::Accept => Ok(()),
            UnknownKeys::Reject => {
                Err("no rule matches this key and desired.unknown_keys = \"reject\"".to_owned())
            }
        };
    };

    if value.is_null() {
        return if rule.nullable {
            Ok(())
        } else {
            Err("null (remove) is not allowed for this key".to_owned())
        };
    }

    if let Some(value_type) = rule.value_type {
        check_type(value_type, value)?;
    }

    if rule.min.is_some() || rule.max.is_some() {
        let Value::Number(number) = value else {
            return Err(format!("expected a number, found {}", kind_of(value)));
        };
        let x = as_f64(number);
        if let Some(min) = rule.min
            && x < min
        {
            return Err(format!(
                "{} is below the minimum {}",
                fmt_number(number),
                fmt_f64(min)
            ));
        }
        if let Some(max) = rule.max
            && x > max
        {
            return Err(format!(
                "{} is above the maximum {}",
                fmt_number(number),
                fmt_f64(max)
            ));
        }
    }

    if let Some(allowed) = &rule.one_of
        && !allowed.iter().any(|candidate| json_eq(candidate, value))
    {
        return Err(format!(
            "{} is not one of {}",
            shown(value),
            shown(&Value::Array(allowed.clone()))
        ));
    }

    if let Some(max_length) = rule.max_length {
        let (length, what, unit) = match value {
            Value::String(s) => (s.chars().count(), "string", "characters"),
            Value::Array(items) => (items.len(), "array", "items"),
            Value::Object(members) => (members.len(), "object", "members"),
            _ => return Ok(()),
        };
        if length > max_length {
            return Err(format!(
                "{what} of {length} {unit} is longer than {max_length}"
            ));
        }
    }

    Ok(())
}

/// Nesting depth of arrays and objects: a scalar is 0, `[]` and `{}` are 1, `[[1]]` is 2,
/// `{"a":[1]}` is 2. Iterative, so no input can exhaust the stack.
pub fn depth(value: &Value) -> usize {
    let mut deepest = 0;
    let mut stack: Vec<(&Value, usize)> = vec![(value, 0)];
    while let Some((value, above)) = stack.pop() {
        match value {
            Value::Array(items) => {
                deepest = deepest.max(above + 1);
                stack.extend(items.iter().map(|item| (item, above + 1)));
            }
            Value::Object(members) => {
                deepest = deepest.max(above + 1);
                stack.extend(members.values().map(|member| (member, above + 1)));
            }
            _ => {}
        }
    }
    deepest
}

fn check_type(expected: ValueType, value: &Value) -> Result<(), String> {
    let ok = match expected {
        ValueType::Bool => value.is_boolean(),
        ValueType::Integer => match value {
            Value::Number(n) => is_integer(n),
            _ => false,
        },
        ValueType::Number => value.is_number(),
        ValueType::String => value.is_string(),
        ValueType::Object => value.is_object(),
        ValueType::Array => value.is_array(),
    };
    if ok {
        return Ok(());
    }
    let found = match value {
        // "found a number" would read as a contradiction.
        Value::Number(n) if expected == ValueType::Integer => {
            format!("the number {} (it has a fractional part)", fmt_number(n))
        }
        other => kind_of(other).to_owned(),
    };
    Err(format!("expected {}, found {found}", type_name(expected)))
}

fn is_integer(n: &Number) -> bool {
    n.is_i64()
        || n.is_u64()
        || n.as_f64()
            .is_some_and(|x| x.is_finite() && x.fract() == 0.0)
}

fn type_name(value_type: ValueType) -> &'static str {
    match value_type {
        ValueType::Bool => "a boolean",
        ValueType::Integer => "an integer",
        ValueType::Number => "a number",
        ValueType::String => "a string",
        ValueType::Object => "an object",
        ValueType::Array => "an array",
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn as_f64(n: &Number) -> f64 {
    // `as_f64` is `Some` for every number without serde_json's arbitrary_precision.
    n.as_f64().unwrap_or(f64::NAN)
}

/// A bound as written: `20`, `20.5`, `-3`, `1e300`.
fn fmt_f64(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x:?}")
    }
}

/// A value as written: `21`, `20.5`, `3.0`, `1e21`.
fn fmt_number(n: &Number) -> String {
    if n.is_i64() || n.is_u64() {
        n.to_string()
    } else {
        format!("{:?}", as_f64(n))
    }
}

/// Compact JSON, cut at [`SHOWN_MAX`] characters.
fn shown(value: &Value) -> String {
    let json = value.to_string();
    if json.chars().count() <= SHOWN_MAX {
        json
    } else {
        let mut short: String = json.chars().take(SHOWN_MAX).collect();
        short.push('…');
        short
    }
}

/// JSON equality with numbers compared by value (`3 == 3.0`).
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => number_eq(x, y),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_eq(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(key, x)| y.get(key).is_some_and(|y| json_eq(x, y)))
        }
        _ => a == b,
    }
}

fn number_eq(x: &Number, y: &Number) -> bool {
    let exact = |n: &Number| {
        n.as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from))
    };
    match (exact(x), exact(y)) {
        (Some(x), Some(y)) => x == y,
        _ => as_f64(x) == as_f64(y),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::model::glob::KeyGlob;

    /// A rule for `*` with nothing set: accepts everything.
    fn rule() -> Rule {
        Rule {
            keys: KeyGlob("*".to_owned()),
            value_type: None,
            min: None,
            max: None,
            one_of: None,
            max_length: None,
            nullable: true,
        }
    }

    fn typed(value_type: ValueType) -> Rule {
        Rule {
            value_type: Some(value_type),
            ..rule()
        }
    }

    fn check(rule: &Rule, value: Value) -> Result<(), String> {
        check_value(Some(rule), UnknownKeys::Accept, &value)
    }

    fn err(rule: &Rule, value: Value) -> String {
        match check(rule, value.clone()) {
            Ok(()) => panic!("{value} was accepted"),
            Err(message) => message,
        }
    }

    #[test]
    fn find_rule_returns_the_first_match_in_file_order() {
        let rules = vec![
            Rule {
                keys: KeyGlob("led.mode".to_owned()),
                max_length: Some(1),
                ..rule()
            },
            Rule {
                keys: KeyGlob("led.*".to_owned()),
                max_length: Some(2),
                ..rule()
            },
            Rule {
                keys: KeyGlob("*".to_owned()),
                max_length: Some(3),
                ..rule()
            },
        ];
        let found = |key| find_rule(&rules, key).and_then(|r| r.max_length);
        assert_eq!(found("led.mode"), Some(1));
        assert_eq!(found("led.color"), Some(2));
        assert_eq!(found("setpoint"), Some(3));
        assert_eq!(find_rule(&rules[..2], "setpoint"), None);
        assert_eq!(find_rule(&[], "x"), None);
    }

    #[test]
    fn keys_without_a_rule_follow_unknown_keys() {
        for value in [json!(1), json!(null), json!({"a": [1]})] {
            assert_eq!(check_value(None, UnknownKeys::Accept, &value), Ok(()));
            assert_eq!(
                check_value(None, UnknownKeys::Reject, &value),
                Err("no rule matches this key and desired.unknown_keys = \"reject\"".to_owned())
            );
        }
        let rules = [Rule {
            keys: KeyGlob("a".to_owned()),
            ..rule()
        }];
        assert!(check_key(&rules, UnknownKeys::Reject, "a", &json!(1)).is_ok());
        assert!(check_key(&rules, UnknownKeys::Reject, "b", &json!(1)).is_err());
    }

    #[test]
    fn a_rule_with_nothing_set_accepts_everything() {
        for value in [
            json!(null),
            json!(true),
            json!(-1.5),
            json!("x"),
            json!([]),
            json!({}),
        ] {
            assert_eq!(check(&rule(), value), Ok(()));
        }
    }

    #[test]
    fn null_is_allowed_unless_the_rule_is_not_nullable() {
        // A nullable rule lets null through whatever else it asks of values.
        let strict = Rule {
            value_type: Some(ValueType::Integer),
            min: Some(1.0),
            one_of: Some(vec![json!(1)]),
            ..rule()
        };
        assert_eq!(check(&strict, json!(null)), Ok(()));
        let not_nullable = Rule {
            nullable: false,
            ..rule()
        };
        assert_eq!(
            err(&not_nullable, json!(null)),
            "null (remove) is not allowed for this key"
        );
        assert_eq!(check(&not_nullable, json!(0)), Ok(()));
    }

    #[test]
    fn type_bool_string_object_array() {
        let cases = [
            (
                ValueType::Bool,
                json!(false),
                json!("false"),
                "a boolean",
                "a string",
            ),
            (
                ValueType::String,
                json!(""),
                json!(1),
                "a string",
                "a number",
            ),
            (
                ValueType::Object,
                json!({"a": 1}),
                json!([1]),
                "an object",
                "an array",
            ),
            (
                ValueType::Array,
                json!([]),
                json!({}),
                "an array",
                "an object",
            ),
        ];
        for (value_type, good, bad, expected, found) in cases {
            assert_eq!(check(&typed(value_type), good), Ok(()));
            assert_eq!(
                err(&typed(value_type), bad),
                format!("expected {expected}, found {found}")
            );
        }
        assert_eq!(
            err(&typed(ValueType::String), json!(true)),
            "expected a string, found a boolean"
        );
    }

    #[test]
    fn type_number_accepts_integers_and_floats() {
        let number = typed(ValueType::Number);
        for value in [
            json!(0),
            json!(-7),
            json!(u64::MAX),
            json!(2.5),
            json!(-1e300),
        ] {
            assert_eq!(check(&number, value), Ok(()));
        }
        assert_eq!(
            err(&number, json!("20")),
            "expected a number, found a string"
        );
    }

    #[test]
    fn type_integer_accepts_whole_numbers_including_whole_floats() {
        let integer = typed(ValueType::Integer);
        for value in [
            json!(0),
            json!(-7),
            json!(i64::MIN),
            json!(u64::MAX),
            json!(3.0),
        ] {
            assert_eq!(check(&integer, value.clone()), Ok(()), "{value}");
        }
        // A float from JSON text "3.0" too.
        let parsed: Value = serde_json::from_str("3.0").unwrap();
        assert!(parsed.is_f64());
        assert_eq!(check(&integer, parsed), Ok(()));
        assert_eq!(
            err(&integer, json!(2.5)),
            "expected an integer, found the number 2.5 (it has a fractional part)"
        );
        assert_eq!(
            err(&integer, json!("3")),
            "expected an integer, found a string"
        );
    }

    #[test]
    fn min_and_max_are_inclusive_bounds() {
        let range = Rule {
            min: Some(5.0),
            max: Some(20.0),
            ..typed(ValueType::Number)
        };
        for value in [json!(5), json!(20), json!(12.5), json!(5.0)] {
            assert_eq!(check(&range, value), Ok(()));
        }
        assert_eq!(err(&range, json!(20.5)), "20.5 is above the maximum 20");
        assert_eq!(err(&range, json!(21)), "21 is above the maximum 20");
        assert_eq!(err(&range, json!(4.99)), "4.99 is below the minimum 5");
        assert_eq!(err(&range, json!(-3)), "-3 is below the minimum 5");

        let only_max = Rule {
            max: Some(0.5),
            ..rule()
        };
        assert_eq!(check(&only_max, json!(-1e300)), Ok(()));
        assert_eq!(err(&only_max, json!(1)), "1 is above the maximum 0.5");
        let only_min = Rule {
            min: Some(-1e300),
            ..rule()
        };
        assert_eq!(
            err(&only_min, json!(-1e301)),
            "-1e301 is below the minimum -1e300"
        );
        let huge = Rule {
            max: Some(1e20),
            ..rule()
        };
        assert_eq!(check(&huge, json!(u64::MAX)), Ok(()));
        assert_eq!(err(&huge, json!(1e21)), "1e21 is above the maximum 1e20");
    }

    #[test]
    fn bounds_without_a_type_refuse_non_numbers() {
        let bounded = Rule {
            min: Some(0.0),
            ..rule()
        };
        assert_eq!(
            err(&bounded, json!("5")),
            "expected a number, found a string"
        );
        assert_eq!(
            err(&bounded, json!([5])),
            "expected a number, found an array"
        );
        assert_eq!(
            err(&bounded, json!(true)),
            "expected a number, found a boolean"
        );
        assert_eq!(check(&bounded, json!(null)), Ok(()));
    }

    #[test]
    fn enum_compares_as_json_with_numbers_by_value() {
        let modes = Rule {
            one_of: Some(vec![json!("eco"), json!("boost")]),
            ..rule()
        };
        assert_eq!(check(&modes, json!("eco")), Ok(()));
        assert_eq!(
            err(&modes, json!("fast")),
            "\"fast\" is not one of [\"eco\",\"boost\"]"
        );
        assert_eq!(
            err(&modes, json!(["eco"])),
            "[\"eco\"] is not one of [\"eco\",\"boost\"]"
        );

        let numbers = Rule {
            one_of: Some(vec![
                json!(1),
                json!(2.5),
                json!(u64::MAX),
                json!({"a": [3]}),
            ]),
            ..rule()
        };
        for value in [
            json!(1),
            json!(1.0),
            json!(2.5),
            json!(u64::MAX),
            json!({"a": [3.0]}),
        ] {
            assert_eq!(check(&numbers, value.clone()), Ok(()), "{value}");
        }
        for value in [
            json!(2),
            json!("1"),
            json!(true),
            json!({"a": [3], "b": 1}),
            json!({"b": [3]}),
        ] {
            assert!(check(&numbers, value.clone()).is_err(), "{value}");
        }
        assert!(check(&numbers, json!(u64::MAX - 1)).is_err());
        assert!(check(&numbers, json!(-1)).is_err());
    }

    #[test]
    fn long_values_are_cut_in_messages() {
        let modes = Rule {
            one_of: Some(vec![json!("a".repeat(200))]),
            ..rule()
        };
        let message = err(&modes, json!("b".repeat(1000)));
        assert!(message.chars().count() < 200, "{message}");
        assert!(message.contains('…'), "{message}");
    }

    #[test]
    fn max_length_counts_characters_items_and_members() {
        let short = Rule {
            max_length: Some(3),
            ..rule()
        };
        for value in [
            json!(""),
            json!("abc"),
            json!("äöü"),
            json!([1, 2, 3]),
            json!({"a": 1, "b": 2, "c": 3}),
            // Does not apply to numbers and booleans.
            json!(123_456),
            json!(true),
        ] {
            assert_eq!(check(&short, value.clone()), Ok(()), "{value}");
        }
        assert_eq!(
            err(&short, json!("abcd")),
            "string of 4 characters is longer than 3"
        );
        assert_eq!(
            err(&short, json!("äöüß")),
            "string of 4 characters is longer than 3"
        );
        assert_eq!(
            err(&short, json!([1, 2, 3, 4])),
            "array of 4 items is longer than 3"
        );
        assert_eq!(
            err(&short, json!({"a": 1, "b": 2, "c": 3, "d": 4})),
            "object of 4 members is longer than 3"
        );
        let string64 = Rule {
            max_length: Some(64),
            ..typed(ValueType::String)
        };
        assert_eq!(
            err(&string64, json!("x".repeat(80))),
            "string of 80 characters is longer than 64"
        );
        let empty_only = Rule {
            max_length: Some(0),
            ..rule()
        };
        assert_eq!(check(&empty_only, json!([])), Ok(()));
        assert!(check(&empty_only, json!("x")).is_err());
    }

    #[test]
    fn checks_run_in_order_null_type_bounds_enum_length() {
        let all = Rule {
            value_type: Some(ValueType::Integer),
            min: Some(0.0),
            max: Some(100.0),
            one_of: Some(vec![json!(10), json!(200)]),
            max_length: None,
            nullable: false,
            ..rule()
        };
        assert_eq!(
            err(&all, json!(null)),
            "null (remove) is not allowed for this key"
        );
        assert_eq!(
            err(&all, json!("10")),
            "expected an integer, found a string"
        );
        assert_eq!(err(&all, json!(200)), "200 is above the maximum 100");
        assert_eq!(err(&all, json!(11)), "11 is not one of [10,200]");
        assert_eq!(check(&all, json!(10)), Ok(()));
    }

    #[test]
    fn depth_counts_nested_arrays_and_objects() {
        assert_eq!(depth(&json!(null)), 0);
        assert_eq!(depth(&json!(1)), 0);
        assert_eq!(depth(&json!("[[]]")), 0);
        assert_eq!(depth(&json!([])), 1);
        assert_eq!(depth(&json!({})), 1);
        assert_eq!(depth(&json!([1, "a", true])), 1);
        assert_eq!(depth(&json!([[1]])), 2);
        assert_eq!(depth(&json!({"a": [1]})), 2);
        assert_eq!(depth(&json!([1, [2, [3]], {"a": {"b": {"c": []}}}])), 5);
    }

    #[test]
    fn depth_of_a_very_deep_value_does_not_exhaust_the_stack() {
        let mut value = json!(0);
        for _ in 0..100_000 {
            value = Value::Array(vec![value]);
        }
        assert_eq!(depth(&value), 100_000);
        // serde_json's Drop of a Value is recursive: take it apart iteratively.
        let mut rest = Some(value);
        while let Some(Value::Array(mut items)) = rest {
            rest = items.pop();
        }
    }
}
