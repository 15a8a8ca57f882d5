//! The command request and response documents (docs/PROTOCOL.md §5), and the arguments of a request.
//!
//! Request: `{"id": "req-1", "args": {...}, "expires": 1764150060000}` in CBOR or JSON (by
//! its first non-whitespace byte); `id` 1-64 characters, required; `args` an optional map;
//! `expires` optional Unix ms. Other fields are ignored (forward compatibility).
//!
//! Response: `{"id": .., "ok": true, "result": {..}}` or
//! `{"id": .., "ok": false, "error": {"code": .., "message": ..}}`.

use crate::model::text::shorten;
use ciborium::Value as Cbor;
use serde_json::{Map, Value, json};

use super::CommandName;
use crate::config::Encoding;
use crate::model::doc;

/// Largest request accepted, as received.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Largest response sent (in either encoding); a bigger result is answered `failed`.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// Longest `id`, in characters.
pub const MAX_ID_CHARS: usize = 64;
/// Deepest nesting inside `args`.
const MAX_DEPTH: usize = 32;

/// The error codes of docs/PROTOCOL.md §5.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Malformed request or arguments.
    BadRequest,
    /// No command of that name.
    UnknownCommand,
    /// Not enabled by `[control] allow`.
    Forbidden,
    /// Past its `expires`; not run.
    Expired,
    /// It ran (or was interrupted) and did not succeed.
    Failed,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad-request",
            ErrorCode::UnknownCommand => "unknown-command",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Expired => "expired",
            ErrorCode::Failed => "failed",
        }
    }
}

/// A readable request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub id: String,
    pub args: Map<String, Value>,
    pub expires: Option<u64>,
}

/// An unreadable request: the message of its `bad-request`, and its id if one was readable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest {
    pub id: Option<String>,
    pub message: String,
}

/// Reads a request in `encoding`.
pub fn parse(payload: &[u8], encoding: Encoding) -> Result<Request, BadRequest> {
    let bad = |id: Option<String>, message: String| BadRequest { id, message };
    if payload.len() > MAX_REQUEST_BYTES {
        return Err(bad(
            None,
            format!(
                "request of {} bytes is larger than {MAX_REQUEST_BYTES} bytes",
                payload.len()
            ),
        ));
    }
    let tree = doc::parse_tree(payload, encoding).map_err(|e| bad(None, e.to_string()))?;
    let Cbor::Map(fields) = tree else {
        return Err(bad(None, "the request is not a map/object".into()));
    };
    // The id first, so that every later problem can be answered with it.
    let ids: Vec<&Cbor> = fields
        .iter()
        .filter(|(k, _)| matches!(k, Cbor::Text(k) if k == "id"))
        .map(|(_, v)| v)
        .collect();
    let id = match ids.as_slice() {
        [] => return Err(bad(None, "id is missing".into())),
        [Cbor::Text(id)] => {
            let n = id.chars().count();
            if n == 0 || n > MAX_ID_CHARS {
                return Err(bad(
                    None,
                    format!("id must be 1-{MAX_ID_CHARS} characters, found {n}"),
                ));
            }
            id.clone()
        }
        [_] => return Err(bad(None, "id must be a string".into())),
        _ => return Err(bad(None, "field \"id\" appears twice".into())),
    };
    let mut args = None;
    let mut expires = None;
    let mut seen = std::collections::HashSet::new();
    for (k, v) in fields {
        let Cbor::Text(k) = k else {
            return Err(bad(Some(id), "a field name is not text".into()));
        };
        if !seen.insert(k.clone()) {
            return Err(bad(
                Some(id),
                format!("field {} appears twice", doc::quote_short(&k)),
            ));
        }
        match k.as_str() {
            "args" => {
                args = match v {
                    Cbor::Null => None,
                    Cbor::Map(_) => match doc::to_json(v, 0, MAX_DEPTH) {
                        Ok(Value::Object(m)) => Some(m),
                        Ok(_) => None,
                        Err(e) => return Err(bad(Some(id), format!("args: {e}"))),
                    },
                    _ => return Err(bad(Some(id), "args must be a map/object".into())),
                }
            }
            "expires" => {
                expires = match v {
                    Cbor::Null => None,
                    Cbor::Integer(i) => match u64::try_from(i128::from(i)) {
                        Ok(e) => Some(e),
                        Err(_) => {
                            return Err(bad(
                                Some(id),
                                "expires must be an unsigned integer (Unix ms)".into(),
                            ));
                        }
                    },
                    _ => {
                        return Err(bad(
                            Some(id),
                            "expires must be an unsigned integer (Unix ms)".into(),
                        ));
                    }
                }
            }
            _ => {} // "id" (read above) and unknown fields (ignored)
        }
    }
    Ok(Request {
        id,
        args: args.unwrap_or_default(),
        expires,
    })
}

/// `{"id": id, "ok": true, "result": result}`.
pub fn ok(id: &str, result: Value) -> Value {
    json!({"id": id, "ok": true, "result": result})
}

/// `{"id": id or null, "ok": false, "error": {"code": .., "message": ..}}`.
pub fn error(id: Option<&str>, code: ErrorCode, message: &str) -> Value {
    json!({"id": id, "ok": false, "error": {"code": code.as_str(), "message": message}})
}

/// The response itself if it fits in [`MAX_RESPONSE_BYTES`] in both encodings, else a
/// `failed` answer saying so.
pub fn bounded(response: Value, id: &str) -> Value {
    let size = doc::encode(&response, Encoding::Json)
        .len()
        .max(doc::encode(&response, Encoding::Cbor).len());
    if size <= MAX_RESPONSE_BYTES {
        return response;
    }
    error(
        Some(id),
        ErrorCode::Failed,
        &format!(
            "the response of {size} bytes is larger than {MAX_RESPONSE_BYTES} bytes; ask for \
             less (e.g. a smaller limit)"
        ),
    )
}

/// The arguments of one request, taken one by one; [`Args::finish`] refuses any left over.
#[derive(Debug)]
pub struct Args {
    command: CommandName,
    map: Map<String, Value>,
    known: Vec<&'static str>,
}

impl Args {
    pub fn new(command: CommandName, map: Map<String, Value>) -> Self {
        Self {
            command,
            map,
            known: Vec::new(),
        }
    }

    fn take(&mut self, name: &'static str) -> Option<Value> {
        self.known.push(name);
        self.map.remove(name).filter(|v| !v.is_null())
    }

    fn wrong(&self, name: &str, what: &str, found: &Value) -> String {
        format!(
            "{}: args.{name} must be {what}, found {}",
            self.command,
            shorten(&found.to_string())
        )
    }

    /// A string argument, if given.
    pub fn str(&mut self, name: &'static str) -> Result<Option<String>, String> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.wrong(name, "a string", &other)),
        }
    }

    /// An unsigned integer argument, if given.
    pub fn u64(&mut self, name: &'static str) -> Result<Option<u64>, String> {
        match self.take(name) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) => Ok(Some(n)),
                None => Err(self.wrong(name, "an unsigned integer", &v)),
            },
        }
    }

    /// A boolean argument, if given.
    pub fn bool(&mut self, name: &'static str) -> Result<Option<bool>, String> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(other) => Err(self.wrong(name, "true or false", &other)),
        }
    }

    /// A required argument is missing.
    pub fn missing(&self, name: &str, what: &str) -> String {
        format!("{}: args.{name} is required ({what})", self.command)
    }

    /// Refuses arguments the command does not take (a misspelt one is never ignored).
    pub fn finish(self) -> Result<(), String> {
        let Some(unknown) = self.map.keys().next() else {
            return Ok(());
        };
        let takes = if self.known.is_empty() {
            "takes no arguments".to_owned()
        } else {
            format!("takes {}", self.known.join(", "))
        };
        Err(format!(
            "{}: unknown argument {:?}; the command {takes}",
            self.command,
            shorten(unknown)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cbor(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(v, &mut out).unwrap();
        out
    }

    #[test]
    fn requests_in_json_and_cbor_read_the_same() {
        let v = json!({"id": "req-1", "args": {"key": "a", "limit": 3}, "expires": 17, "x": 1});
        let j = parse(v.to_string().as_bytes(), Encoding::Json).unwrap();
        let c = parse(&cbor(&v), Encoding::Cbor).unwrap();
        assert_eq!(j, c);
        assert_eq!(j.id, "req-1");
        assert_eq!(j.expires, Some(17));
        assert_eq!(j.args["limit"], 3);
        let bare = parse(br#"{"id":"x"}"#, Encoding::Json).unwrap();
        assert!(bare.args.is_empty() && bare.expires.is_none());
        let nulls = parse(br#"{"id":"x","args":null,"expires":null}"#, Encoding::Json).unwrap();
        assert_eq!(nulls, bare);
    }

    #[test]
    fn unreadable_requests_say_why_and_keep_the_id_when_they_can() {
        let long = format!(r#"{{"id":"{}"}}"#, "x".repeat(65));
        for (payload, id, why) in [
            (&b"{nope"[..], None, "invalid JSON"),
            (b"\xff\x00", None, "invalid CBOR"),
            (b"\x81\x01", None, "not a map"),
            (br#"{"args":{}}"#, None, "id is missing"),
            (br#"{"id":""}"#, None, "1-64"),
            (long.as_bytes(), None, "1-64"),
            (br#"{"id":5}"#, None, "must be a string"),
            (br#"{"id":"a","id":"b"}"#, None, "twice"),
            (br#"{"id":"a","args":[1]}"#, Some("a"), "args must be"),
            (br#"{"id":"a","args":{"k":1,"k":2}}"#, Some("a"), "twice"),
            (br#"{"id":"a","expires":-1}"#, Some("a"), "expires must be"),
            (
                br#"{"id":"a","expires":"soon"}"#,
                Some("a"),
                "expires must be",
            ),
            (br#"{"id":"a","expires":1,"expires":2}"#, Some("a"), "twice"),
        ] {
            let e = parse(payload, doc::sniff(payload)).unwrap_err();
            assert_eq!(e.id.as_deref(), id, "{payload:?}: {e:?}");
            assert!(e.message.contains(why), "{payload:?}: {e:?}");
        }
        let big = vec![b' '; MAX_REQUEST_BYTES + 1];
        assert!(
            parse(&big, Encoding::Json)
                .unwrap_err()
                .message
                .contains("larger")
        );
    }

    #[test]
    fn responses_have_the_spec_shape_and_a_bounded_size() {
        assert_eq!(
            ok("a", json!({"pong": true})),
            json!({"id": "a", "ok": true, "result": {"pong": true}})
        );
        assert_eq!(
            error(None, ErrorCode::BadRequest, "m"),
            json!({"id": null, "ok": false, "error": {"code": "bad-request", "message": "m"}})
        );
        let small = ok("a", json!({"x": 1}));
        assert_eq!(bounded(small.clone(), "a"), small);
        let big = ok("a", json!({"x": "y".repeat(MAX_RESPONSE_BYTES)}));
        let capped = bounded(big, "a");
        assert_eq!(capped["error"]["code"], "failed");
        assert_eq!(capped["id"], "a");
    }

    #[test]
    fn args_are_typed_and_unknown_ones_refused() {
        let map = |v: Value| v.as_object().unwrap().clone();
        let mut a = Args::new(
            CommandName::History,
            map(json!({"key": "k", "limit": 2, "n": null})),
        );
        assert_eq!(a.str("key").unwrap().as_deref(), Some("k"));
        assert_eq!(a.u64("limit").unwrap(), Some(2));
        assert_eq!(a.u64("n").unwrap(), None);
        a.finish().unwrap();
        let mut a = Args::new(CommandName::History, map(json!({"limit": -1})));
        assert!(a.u64("limit").unwrap_err().contains("unsigned"));
        let mut a = Args::new(CommandName::History, map(json!({"key": "k", "limt": 2})));
        a.str("key").unwrap();
        let e = a.finish().unwrap_err();
        assert!(e.contains("\"limt\"") && e.contains("takes key"), "{e}");
        let a = Args::new(CommandName::Ping, map(json!({"x": 1})));
        assert!(a.finish().unwrap_err().contains("takes no arguments"));
    }

    // Regression (fuzzing, issue 7): the refusal quoted a repeated field name whole, so a
    // request within MAX_REQUEST_BYTES got a response of 100 KB, over MAX_RESPONSE_BYTES.
    #[test]
    fn refusals_of_long_repeated_names_fit_in_a_response() {
        let long = "\u{1}".repeat(20_000);
        let t = |s: &str| Cbor::Text(s.to_owned());
        let twice = Cbor::Map(vec![(t(&long), Cbor::Null), (t(&long), Cbor::Null)]);
        let mut field = vec![(t("id"), t("a"))];
        field.extend([(t(&long), Cbor::Null), (t(&long), Cbor::Null)]);
        let args = vec![(t("id"), t("a")), (t("args"), twice)];
        for fields in [field, args] {
            let mut payload = Vec::new();
            ciborium::into_writer(&Cbor::Map(fields), &mut payload).unwrap();
            assert!(payload.len() <= MAX_REQUEST_BYTES);
            let bad = parse(&payload, Encoding::Cbor).unwrap_err();
            assert!(bad.message.contains("twice"), "{}", bad.message);
            let response = error(bad.id.as_deref(), ErrorCode::BadRequest, &bad.message);
            for encoding in [Encoding::Json, Encoding::Cbor] {
                let n = doc::encode(&response, encoding).len();
                assert!(n <= MAX_RESPONSE_BYTES, "{n} bytes in {encoding:?}");
            }
        }
    }
}
