//! Local MQTT sources (docs/PROTOCOL.md §7.1, `[[source.mqtt]]`): MQTT topic filters, the
//! key template (`{1}.temperature`) and the value rule that turn a local message into a
//! change. Plain functions: `config` checks the rules with them, the source task applies
//! them to each message.

use serde_json::Value;

use crate::model::change::{ChangeError, NewChange, RawChange, validate_key, wide_integer};

/// Longest topic filter of a source.
pub const MAX_FILTER_BYTES: usize = 1024;
/// Highest topic level a key template may name.
pub const MAX_LEVEL: usize = 32;

/// Checks an MQTT topic filter (MQTT 3.1.1 §4.7): `+` and `#` only as whole levels, `#`
/// only last; no NUL; not empty.
pub fn check_filter(f: &str) -> Result<(), String> {
    if f.is_empty() || f.len() > MAX_FILTER_BYTES || f.contains('\0') {
        return Err(format!(
            "expected an MQTT topic filter of 1-{MAX_FILTER_BYTES} bytes without NUL, such as \
             \"sensors/+/temperature\""
        ));
    }
    let levels: Vec<&str> = f.split('/').collect();
    for (i, l) in levels.iter().enumerate() {
        let wild = l.contains(['+', '#']);
        if wild && *l != "+" && *l != "#" {
            return Err(format!(
                "level {:?} of {f:?}: + and # must be a whole level",
                l
            ));
        }
        if *l == "#" && i + 1 != levels.len() {
            return Err(format!("# must be the last level of {f:?}"));
        }
    }
    Ok(())
}

/// Whether `topic` matches `filter` (a filter starting with a wildcard never matches a
/// topic starting with `$`).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut t = topic.split('/');
    for f in filter.split('/') {
        match (f, t.next()) {
            ("#", _) => return true,
            ("+", Some(_)) => {}
            (f, Some(l)) if f == l => {}
            _ => return false,
        }
    }
    t.next().is_none()
}

/// Whether some topic matches both filters (the loop guard: can a source filter receive
/// what the agent itself publishes?).
pub fn overlap(a: &str, b: &str) -> bool {
    let dollar = |f: &str| f.starts_with('$');
    let wild = |f: &str| f.starts_with(['+', '#']);
    if (dollar(a) && wild(b)) || (dollar(b) && wild(a)) {
        return false;
    }
    let (mut x, mut y) = (a.split('/'), b.split('/'));
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (None, None) => return true,
            (Some(p), Some(q)) if p == "+" || q == "+" || p == q => {}
            _ => return false,
        }
    }
}

/// One part of a key template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    /// A topic level, 1-based.
    Level(usize),
}

/// `key`: text with `{N}` for the topic's level N (1-based), e.g. `"{2}.temperature"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTemplate(Vec<Part>);

impl KeyTemplate {
    /// Parses `s` for a source with `filter` (already checked): the text must be key
    /// characters, and a level the filter does not always have (no `#`) is refused.
    pub fn parse(s: &str, filter: &str) -> Result<KeyTemplate, String> {
        const FORM: &str = "expected key characters [A-Za-z0-9_.-] and {N} for topic level N \
                            (from 1), such as \"{2}.temperature\"";
        let levels = filter.split('/').count();
        let open_ended = filter.ends_with('#');
        let mut parts = Vec::new();
        let mut rest = s;
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix('{') {
                let (n, tail) = after
                    .split_once('}')
                    .ok_or_else(|| format!("{FORM}; found an unclosed {{ in {s:?}"))?;
                let n: usize = n
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LEVEL).contains(n))
                    .ok_or_else(|| format!("{FORM}; {{{n}}} is not a level 1-{MAX_LEVEL}"))?;
                // With `#` any level may exist; a message without it is invalid.
                if n > levels && !open_ended {
                    return Err(format!(
                        "{{{n}}}: the filter {filter:?} has {levels} level(s), so topics it \
                         matches have no level {n}"
                    ));
                }
                parts.push(Part::Level(n));
                rest = tail;
            } else {
                let end = rest.find('{').unwrap_or(rest.len());
                let text = &rest[..end];
                if let Some(c) = text
                    .chars()
                    .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
                {
                    return Err(format!("{FORM}; found {c:?} in {s:?}"));
                }
                parts.push(Part::Text(text.to_owned()));
                rest = &rest[end..];
            }
        }
        if parts.is_empty() {
            return Err(format!("{FORM}; found an empty string"));
        }
        Ok(KeyTemplate(parts))
    }

    /// The key of a message on `topic`.
    pub fn render(&self, topic: &str) -> Result<String, String> {
        let levels: Vec<&str> = topic.split('/').collect();
        let mut key = String::with_capacity(topic.len() + 16);
        for p in &self.0 {
            match p {
                Part::Text(t) => key.push_str(t),
                Part::Level(n) => match levels.get(n - 1) {
                    Some(l) => key.push_str(l),
                    None => return Err(format!("topic has no level {n}")),
                },
            }
        }
        validate_key(&key).map_err(|e| e.to_string())?;
        Ok(key)
    }
}

/// `value`: what of the payload becomes the change's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueRule {
    /// `"payload"`: the payload as JSON if it is JSON, else as a UTF-8 string.
    Payload,
    /// `"json"`: the payload as JSON (else invalid).
    Json,
    /// `"string"`: the payload as a UTF-8 string, as is.
    String,
    /// `"number"`: the payload's text (spaces trimmed) as a number.
    Number,
    /// `"/a/b"`: a JSON pointer (RFC 6901) into a JSON payload.
    Pointer(String),
}

impl ValueRule {
    pub fn parse(s: &str) -> Result<ValueRule, String> {
        Ok(match s {
            "payload" => ValueRule::Payload,
            "json" => ValueRule::Json,
            "string" => ValueRule::String,
            "number" => ValueRule::Number,
            p if p.starts_with('/') => ValueRule::Pointer(p.to_owned()),
            other => {
                return Err(format!(
                    "expected \"payload\", \"json\", \"string\", \"number\" or a JSON pointer \
                     such as \"/temperature\", found {other:?}"
                ));
            }
        })
    }

    /// The value of `payload`.
    pub fn extract(&self, payload: &[u8]) -> Result<Value, String> {
        let text = std::str::from_utf8(payload).map_err(|_| "payload is not UTF-8".to_owned());
        match self {
            ValueRule::String => text.map(|t| Value::String(t.to_owned())),
            ValueRule::Number => {
                let t = text?.trim();
                let n = match t.parse::<i64>() {
                    Ok(i) => Some(serde_json::Number::from(i)),
                    Err(_) => t.parse::<f64>().ok().and_then(serde_json::Number::from_f64),
                };
                n.map(Value::Number)
                    .ok_or_else(|| format!("payload {:?} is not a number", short(t)))
            }
            ValueRule::Payload => {
                let t = text?;
                if t.is_empty() {
                    return Err("empty payload".to_owned());
                }
                Ok(json(t).unwrap_or_else(|_| Value::String(t.to_owned())))
            }
            ValueRule::Json => json(text?),
            ValueRule::Pointer(p) => json(text?)?
                .pointer_mut(p)
                .map(Value::take)
                .ok_or_else(|| format!("payload has nothing at {p}")),
        }
    }
}

/// JSON text to a value, refusing integers beyond 64 bits (they would become floats).
fn json(t: &str) -> Result<Value, String> {
    let v: Value = serde_json::from_str(t).map_err(|e| format!("payload is not JSON: {e}"))?;
    match wide_integer(t) {
        Some(lit) => Err(format!(
            "payload holds the integer {}, beyond 64 bits",
            short(lit)
        )),
        None => Ok(v),
    }
}

fn short(s: &str) -> String {
    crate::model::text::shorten(s)
}

/// A local message as a change: the key from the topic, the value from the payload.
pub fn map(
    key: &KeyTemplate,
    value: &ValueRule,
    topic: &str,
    payload: &[u8],
) -> Result<NewChange, String> {
    let key = key.render(topic)?;
    let value = value.extract(payload)?;
    RawChange::new(key, value)
        .validate()
        .map_err(|e: ChangeError| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn filters_are_checked() {
        for ok in ["a", "a/+/c", "#", "a/#", "+", "/", "$SYS/#"] {
            assert!(check_filter(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/#/c", "a+", "a/b#", "a\0"] {
            assert!(check_filter(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn matching_follows_mqtt() {
        assert!(matches("sensors/+/temperature", "sensors/t1/temperature"));
        assert!(!matches("sensors/+/temperature", "sensors/t1/humidity"));
        assert!(!matches("sensors/+", "sensors/t1/x"));
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("#", "x/y"));
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/x", "$aws/x"));
        assert!(matches("$aws/#", "$aws/x"));
    }

    #[test]
    fn overlap_finds_a_shared_topic() {
        let own = "edgesync/pump-1/#";
        assert!(overlap("#", own));
        assert!(overlap("+/+/reported", own));
        assert!(overlap("edgesync/+/status", own));
        assert!(!overlap("sensors/#", own));
        assert!(!overlap("edgesync/pump-2/#", own));
        assert!(!overlap("#", "$aws/things/t/#"));
        assert!(overlap("$aws/things/+/shadow/x", "$aws/things/t/#"));
        assert!(overlap("a/b", "a/b"));
        assert!(!overlap("a/b", "a/b/c"));
        assert!(overlap("a/+", "+/b"));
    }

    #[test]
    fn key_templates_use_topic_levels() {
        let t = KeyTemplate::parse("{2}.temperature", "sensors/+/temperature").unwrap();
        assert_eq!(
            t.render("sensors/t1/temperature").unwrap(),
            "t1.temperature"
        );
        let t = KeyTemplate::parse("{1}-{3}", "a/#").unwrap();
        assert_eq!(t.render("a/b/c").unwrap(), "a-c");
        assert!(t.render("a/b").unwrap_err().contains("no level 3"));
        // A level that is not a valid key part makes an invalid key.
        let t = KeyTemplate::parse("x.{2}", "s/+").unwrap();
        assert!(t.render("s/bad key").is_err());
        assert!(t.render("s/").is_ok()); // "x." is a valid key
        assert_eq!(
            KeyTemplate::parse("const", "s/+")
                .unwrap()
                .render("s/a")
                .unwrap(),
            "const"
        );
    }

    #[test]
    fn key_templates_are_checked() {
        assert!(KeyTemplate::parse("", "a").is_err());
        assert!(
            KeyTemplate::parse("{3}", "a/+")
                .unwrap_err()
                .contains("no level 3")
        );
        assert!(KeyTemplate::parse("{0}", "a/+").is_err());
        assert!(KeyTemplate::parse("{1", "a/+").is_err());
        assert!(KeyTemplate::parse("a b", "a/+").is_err());
        assert!(KeyTemplate::parse("{x}", "a/+").is_err());
        assert!(KeyTemplate::parse("{9}", "a/#").is_ok());
    }

    #[test]
    fn values_by_rule() {
        let v = |r: &str, p: &[u8]| ValueRule::parse(r).unwrap().extract(p);
        assert_eq!(v("payload", b"{\"a\":1}").unwrap(), json!({"a": 1}));
        assert_eq!(v("payload", b"21.5").unwrap(), json!(21.5));
        assert_eq!(v("payload", b"on").unwrap(), json!("on"));
        assert!(v("payload", b"").is_err());
        assert!(v("payload", b"\xff").is_err());
        assert!(v("json", b"on").is_err());
        assert_eq!(v("json", b"[1]").unwrap(), json!([1]));
        assert_eq!(v("string", b"21.5").unwrap(), json!("21.5"));
        assert_eq!(v("number", b" 42\n").unwrap(), json!(42));
        assert_eq!(v("number", b"-1.5e3").unwrap(), json!(-1500.0));
        assert!(v("number", b"NaN").is_err());
        assert!(v("number", b"x").is_err());
        assert_eq!(v("/a/b", b"{\"a\":{\"b\":[7]}}").unwrap(), json!([7]));
        assert!(v("/a/c", b"{\"a\":{}}").is_err());
        // Beyond 64 bits: kept exact as text by "payload", refused by "json".
        let wide = b"123456789012345678901234567890";
        assert_eq!(
            v("payload", wide).unwrap(),
            json!("123456789012345678901234567890")
        );
        assert!(v("json", wide).unwrap_err().contains("beyond 64 bits"));
        assert!(ValueRule::parse("raw").is_err());
        assert!(ValueRule::parse("").is_err());
    }

    #[test]
    fn map_makes_a_valid_change_or_says_why_not() {
        let k = KeyTemplate::parse("{2}.t", "s/+/t").unwrap();
        let c = map(&k, &ValueRule::Number, "s/p1/t", b"3").unwrap();
        assert_eq!(c.key, "p1.t");
        assert_eq!(
            crate::model::change::decode_value(&c.value).unwrap(),
            json!(3)
        );
        let big = vec![b'a'; 70_000];
        assert!(map(&k, &ValueRule::String, "s/p1/t", &big).is_err());
    }
}
