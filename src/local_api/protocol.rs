//! The local socket's protocol (docs/PROTOCOL.md §6), shared by the server, its client (the
//! CLI's) and queue inspection: the requests as a typed [`Request`], their parsing from a
//! request line with the error codes and messages of §6.1, their serialization for a client,
//! and the shapes of the answer lines.
//!
//! A request line is first read as one flat object of every field any op takes (an unknown
//! field is `bad-request`), then checked for its op: the fields an op does not take are
//! ignored, and a missing or unacceptable one is `bad-request` with a message that names it.
//! The checks that need the daemon's state (a change's `ts` against the clock, whether an
//! acked event is waiting) are the server's.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::model::change::RawChange;
use crate::model::glob::KeyGlob;

/// Longest request line.
pub const MAX_LINE: usize = 1 << 20;

/// Error codes of docs/PROTOCOL.md §6.1.
pub mod code {
    pub const BAD_REQUEST: &str = "bad-request";
    pub const UNKNOWN_OP: &str = "unknown-op";
    pub const INVALID_CHANGE: &str = "invalid-change";
    pub const TOO_LARGE: &str = "too-large";
    pub const STORE_FULL: &str = "store-full";
    pub const IO_ERROR: &str = "io-error";
    /// `rollback` only: the version is not in the key's history, or the handler failed.
    pub const FAILED: &str = "failed";
}

/// A request, one variant per op (docs/PROTOCOL.md §6.1). Serialized, it is a request line
/// (without its newline).
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// Queues the changes, all or none; never empty.
    Report {
        changes: Vec<RawChange>,
    },
    Status,
    /// Ends the link's reconnect backoff wait: retry the broker now.
    Reconnect,
    /// One key of the document, or all of it.
    Get {
        doc: Doc,
        key: Option<String>,
    },
    /// The key's recent desired values, newest first; at most `limit` of them.
    History {
        key: String,
        limit: Option<usize>,
    },
    /// Applies the key's value of `version` again.
    Rollback {
        key: String,
        version: u64,
    },
    /// Reads the queue.
    Queue(QueueQuery),
    /// Sends this connection the desired changes of keys matching these globs; never empty.
    Watch {
        keys: Vec<KeyGlob>,
    },
    /// Answers watch event `id`.
    Ack(Ack),
}

/// The document of a `get`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Doc {
    Reported,
    Desired,
}

impl Doc {
    pub fn name(self) -> &'static str {
        match self {
            Doc::Reported => "reported",
            Doc::Desired => "desired",
        }
    }
}

/// What a `queue` request reads (its `what`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueQuery {
    /// The queue's figures.
    Stats,
    /// A page of changes from seq `from` (default 0), at most `limit` of them.
    Peek {
        from: Option<u64>,
        limit: Option<usize>,
    },
}

/// The answer to a watch event: `ok`, or not with `error` saying why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub id: u64,
    pub ok: bool,
    pub error: Option<String>,
}

impl Ack {
    /// How the event went, as the applier takes it.
    pub fn result(self) -> Result<(), String> {
        if self.ok {
            Ok(())
        } else {
            Err(self
                .error
                .unwrap_or_else(|| "the watching program reported a failure".into()))
        }
    }
}

/// Why a request line is refused before anything is done for it.
#[derive(Debug, Error)]
pub enum RequestError {
    #[error("invalid JSON: {0}")]
    Json(serde_json::Error),
    /// JSON, but not a request object: an unknown field, a missing `op`, a mistyped field.
    #[error("malformed request: {0}")]
    Malformed(serde_json::Error),
    #[error(
        "unknown op {0:?}; expected report, status, get, watch, ack, history, rollback, queue or reconnect"
    )]
    UnknownOp(String),
    /// The op's required `fields` are missing.
    #[error("{op} needs {fields}")]
    Missing {
        op: &'static str,
        fields: &'static str,
    },
    #[error("\"changes\" is empty")]
    NoChanges,
    #[error("unknown doc {0:?}; expected \"desired\" or \"reported\"")]
    UnknownDoc(String),
    #[error("unknown queue request {0:?}; expected \"stats\" or \"peek\"")]
    UnknownQuery(String),
    #[error("key glob {pattern:?}: {reason}")]
    Glob { pattern: String, reason: String },
}

impl RequestError {
    /// Its error code (docs/PROTOCOL.md §6.1).
    pub fn code(&self) -> &'static str {
        match self {
            RequestError::UnknownOp(_) => code::UNKNOWN_OP,
            _ => code::BAD_REQUEST,
        }
    }
}

/// A request line as read: every field of every op.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    op: String,
    #[serde(default)]
    changes: Option<Vec<RawChange>>,
    #[serde(default)]
    doc: Option<String>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    keys: Option<Vec<String>>,
    #[serde(default)]
    id: Option<u64>,
    #[serde(default)]
    ok: Option<bool>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    version: Option<u64>,
    #[serde(default)]
    what: Option<String>,
    #[serde(default)]
    from: Option<u64>,
}

fn missing(op: &'static str, fields: &'static str) -> RequestError {
    RequestError::Missing { op, fields }
}

impl Request {
    /// Parses a request line (without its newline).
    pub fn parse(line: &[u8]) -> Result<Request, RequestError> {
        let w: Wire = serde_json::from_slice(line).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => RequestError::Malformed(e),
            _ => RequestError::Json(e),
        })?;
        match w.op.as_str() {
            "report" => {
                let changes = w.changes.ok_or_else(|| {
                    missing(
                        "report",
                        "\"changes\": [{\"key\": ..., \"value\": ...}, ...]",
                    )
                })?;
                if changes.is_empty() {
                    return Err(RequestError::NoChanges);
                }
                Ok(Request::Report { changes })
            }
            "status" => Ok(Request::Status),
            "reconnect" => Ok(Request::Reconnect),
            "get" => {
                let doc = match w.doc.as_deref() {
                    Some("reported") => Doc::Reported,
                    Some("desired") => Doc::Desired,
                    Some(other) => return Err(RequestError::UnknownDoc(other.to_owned())),
                    None => return Err(missing("get", "\"doc\": \"desired\" or \"reported\"")),
                };
                Ok(Request::Get { doc, key: w.key })
            }
            "history" => Ok(Request::History {
                key: w.key.ok_or_else(|| missing("history", "\"key\""))?,
                limit: w.limit,
            }),
            "rollback" => match (w.key, w.version) {
                (Some(key), Some(version)) => Ok(Request::Rollback { key, version }),
                _ => Err(missing("rollback", "\"key\" and \"version\"")),
            },
            "queue" => {
                QueueQuery::from_fields(w.what.as_deref(), w.from, w.limit).map(Request::Queue)
            }
            "watch" => {
                let keys = w.keys.filter(|k| !k.is_empty());
                let keys = keys.ok_or_else(|| missing("watch", "\"keys\": [\"glob\", ...]"))?;
                let globs = keys.into_iter().map(|k| {
                    KeyGlob::new(&k).map_err(|reason| RequestError::Glob { pattern: k, reason })
                });
                Ok(Request::Watch {
                    keys: globs.collect::<Result<_, _>>()?,
                })
            }
            "ack" => Ok(Request::Ack(Ack {
                id: w.id.ok_or_else(|| missing("ack", "\"id\" of the event"))?,
                ok: w.ok == Some(true),
                error: w.error,
            })),
            other => Err(RequestError::UnknownOp(other.to_owned())),
        }
    }

    /// The request line (without its newline): `{"op":...}` then the op's fields in the
    /// order of the variant, those that are `None` left out. Written field by field rather
    /// than through a `Serialize` derive of the enum: the same bytes, less code in the binary.
    pub fn to_line(&self) -> Result<String, serde_json::Error> {
        let mut line = Line::new(self.op());
        match self {
            Request::Report { changes } => line.raw("changes", &serde_json::to_string(changes)?),
            Request::Status | Request::Reconnect => {}
            Request::Get { doc, key } => {
                line.str("doc", doc.name());
                line.opt_str("key", key.as_deref());
            }
            Request::History { key, limit } => {
                line.str("key", key);
                line.opt_number("limit", limit.map(|n| n as u64));
            }
            Request::Rollback { key, version } => {
                line.str("key", key);
                line.number("version", *version);
            }
            Request::Queue(QueueQuery::Stats) => line.str("what", "stats"),
            Request::Queue(QueueQuery::Peek { from, limit }) => {
                line.str("what", "peek");
                line.opt_number("from", *from);
                line.opt_number("limit", limit.map(|n| n as u64));
            }
            Request::Watch { keys } => {
                line.0.push_str(",\"keys\":[");
                for (i, glob) in keys.iter().enumerate() {
                    if i > 0 {
                        line.0.push(',');
                    }
                    push_json_str(&mut line.0, &glob.0);
                }
                line.0.push(']');
            }
            Request::Ack(ack) => {
                line.number("id", ack.id);
                line.raw("ok", if ack.ok { "true" } else { "false" });
                line.opt_str("error", ack.error.as_deref());
            }
        }
        line.0.push('}');
        Ok(line.0)
    }

    /// Its `op`.
    fn op(&self) -> &'static str {
        match self {
            Request::Report { .. } => "report",
            Request::Status => "status",
            Request::Reconnect => "reconnect",
            Request::Get { .. } => "get",
            Request::History { .. } => "history",
            Request::Rollback { .. } => "rollback",
            Request::Queue(_) => "queue",
            Request::Watch { .. } => "watch",
            Request::Ack(_) => "ack",
        }
    }
}

/// A JSON object being written: `{"op":"..."` and `,"name":value` for each field.
struct Line(String);

impl Line {
    fn new(op: &str) -> Line {
        Line(format!("{{\"op\":\"{op}\""))
    }

    /// `,"name":` then `json`, a JSON text.
    fn raw(&mut self, name: &str, json: &str) {
        self.0.push_str(",\"");
        self.0.push_str(name);
        self.0.push_str("\":");
        self.0.push_str(json);
    }

    fn str(&mut self, name: &str, value: &str) {
        self.raw(name, "");
        push_json_str(&mut self.0, value);
    }

    fn opt_str(&mut self, name: &str, value: Option<&str>) {
        if let Some(value) = value {
            self.str(name, value);
        }
    }

    fn number(&mut self, name: &str, value: u64) {
        self.raw(name, &value.to_string());
    }

    fn opt_number(&mut self, name: &str, value: Option<u64>) {
        if let Some(value) = value {
            self.number(name, value);
        }
    }
}

/// `text` as a JSON string, escaped as serde_json escapes it.
fn push_json_str(out: &mut String, text: &str) {
    out.push_str(&serde_json::Value::from(text).to_string());
}

impl QueueQuery {
    /// The query of a `queue` request's `what`, `from` and `limit` (the latter two only for
    /// `peek`).
    pub fn from_fields(
        what: Option<&str>,
        from: Option<u64>,
        limit: Option<usize>,
    ) -> Result<QueueQuery, RequestError> {
        match what {
            Some("stats") => Ok(QueueQuery::Stats),
            Some("peek") => Ok(QueueQuery::Peek { from, limit }),
            Some(other) => Err(RequestError::UnknownQuery(other.to_owned())),
            None => Err(missing("queue", "\"what\": \"stats\" or \"peek\"")),
        }
    }
}

/// A `report` request streamed by a client: [`REPORT_OPEN`], the changes' JSON texts
/// separated by `,`, [`REPORT_CLOSE`]; the same line as [`Request::Report`] serialized,
/// with each change sent as the client read it.
pub const REPORT_OPEN: &[u8] = b"{\"op\":\"report\",\"changes\":[";
/// See [`REPORT_OPEN`].
pub const REPORT_CLOSE: &[u8] = b"]}";

// ---------------------------------------------------------------------------------------------
// Answers: `{"ok":true, ...}` or `{"ok":false,"error":{"code":C,"message":M}}`.

/// The error object of an answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

/// A failure's answer line.
pub fn error_line(code: &str, message: impl Into<String>) -> String {
    let body = serde_json::json!({"ok": false, "error": {"code": code, "message": message.into()}});
    body.to_string()
}

/// `{"ok":true, ...fields of v}`.
pub fn ok_with(v: serde_json::Value) -> String {
    let mut obj = serde_json::Map::new();
    obj.insert("ok".into(), true.into());
    if let serde_json::Value::Object(m) = v {
        obj.extend(m);
    }
    serde_json::Value::Object(obj).to_string()
}

/// A `report`'s answer: the seqs its changes were queued under, and (only when some were)
/// how many a retention class's deadband or dedupe held back (not queued, no seq).
pub fn appended_line(first_seq: u64, last_seq: u64, filtered: u64) -> String {
    if filtered == 0 {
        return format!("{{\"ok\":true,\"first_seq\":{first_seq},\"last_seq\":{last_seq}}}");
    }
    format!(
        "{{\"ok\":true,\"first_seq\":{first_seq},\"last_seq\":{last_seq},\"filtered\":{filtered}}}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(line: &str) -> (&'static str, String) {
        let e = Request::parse(line.as_bytes()).unwrap_err();
        (e.code(), e.to_string())
    }

    /// Found by the fuzzer (`local_request`): without serde_json's `float_roundtrip` a
    /// float's text could parse to a neighbouring f64, so a reported value lost its last bit.
    #[test]
    fn a_reported_float_keeps_every_bit() {
        for text in [
            "1050000000000200000.2",
            "1.0500000000002e+18",
            "0.1",
            "2.2250738585072014e-308",
        ] {
            let line = format!(r#"{{"op":"report","changes":[{{"key":"temp","value":{text}}}]}}"#);
            let req = Request::parse(line.as_bytes()).unwrap();
            let Request::Report { changes } = &req else {
                panic!("not a report")
            };
            let want: f64 = text.parse().unwrap();
            assert_eq!(changes[0].value.as_f64(), Some(want), "{text}");
            let again = req.to_line().unwrap();
            let back = Request::parse(again.as_bytes()).unwrap();
            assert_eq!(back.to_line().unwrap(), again, "{text}");
        }
    }

    #[test]
    fn every_op_parses_and_serializes_back() {
        let change = crate::model::change::parse_assignment("temp=21.5").unwrap();
        let requests = [
            Request::Report {
                changes: vec![change],
            },
            Request::Status,
            Request::Reconnect,
            Request::Get {
                doc: Doc::Desired,
                key: Some("led".into()),
            },
            Request::Get {
                doc: Doc::Reported,
                key: None,
            },
            Request::History {
                key: "led".into(),
                limit: Some(3),
            },
            Request::Rollback {
                key: "led".into(),
                version: 7,
            },
            Request::Queue(QueueQuery::Stats),
            Request::Queue(QueueQuery::Peek {
                from: Some(4),
                limit: Some(20),
            }),
            Request::Queue(QueueQuery::Peek {
                from: None,
                limit: None,
            }),
            Request::Watch {
                keys: vec![KeyGlob::new("led.*").unwrap()],
            },
            Request::Ack(Ack {
                id: 9,
                ok: false,
                error: Some("busy".into()),
            }),
        ];
        for r in requests {
            let line = r.to_line().unwrap();
            assert_eq!(Request::parse(line.as_bytes()).unwrap(), r, "{line}");
        }
        assert_eq!(
            Request::Get {
                doc: Doc::Desired,
                key: None
            }
            .to_line()
            .unwrap(),
            r#"{"op":"get","doc":"desired"}"#
        );
    }

    #[test]
    fn a_streamed_report_is_a_report_line() {
        let mut line = REPORT_OPEN.to_vec();
        line.extend_from_slice(br#"{"key":"a","value":1},{"key":"b","value":null,"ts":5}"#);
        line.extend_from_slice(REPORT_CLOSE);
        let Request::Report { changes } = Request::parse(&line).unwrap() else {
            panic!("not a report");
        };
        assert_eq!(changes.len(), 2);
        assert_eq!(changes[1].ts, Some(5));
    }

    #[test]
    fn refusals_have_the_codes_and_messages_of_the_protocol() {
        assert_eq!(
            refused(r#"{"op":"nope"}"#),
            (
                code::UNKNOWN_OP,
                "unknown op \"nope\"; expected report, status, get, watch, ack, history, \
                 rollback, queue or reconnect"
                    .into()
            )
        );
        for (line, message) in [
            (
                r#"{"op":"report"}"#,
                r#"report needs "changes": [{"key": ..., "value": ...}, ...]"#,
            ),
            (r#"{"op":"report","changes":[]}"#, r#""changes" is empty"#),
            (
                r#"{"op":"get"}"#,
                r#"get needs "doc": "desired" or "reported""#,
            ),
            (
                r#"{"op":"get","doc":"x"}"#,
                r#"unknown doc "x"; expected "desired" or "reported""#,
            ),
            (r#"{"op":"history"}"#, r#"history needs "key""#),
            (
                r#"{"op":"rollback","key":"a"}"#,
                r#"rollback needs "key" and "version""#,
            ),
            (
                r#"{"op":"queue"}"#,
                r#"queue needs "what": "stats" or "peek""#,
            ),
            (
                r#"{"op":"queue","what":"drop"}"#,
                r#"unknown queue request "drop"; expected "stats" or "peek""#,
            ),
            (
                r#"{"op":"watch","keys":[]}"#,
                r#"watch needs "keys": ["glob", ...]"#,
            ),
            (r#"{"op":"ack"}"#, r#"ack needs "id" of the event"#),
        ] {
            assert_eq!(refused(line), (code::BAD_REQUEST, message.into()), "{line}");
        }
        let (c, m) = refused(r#"{"op":"watch","keys":["a b"]}"#);
        assert_eq!(c, code::BAD_REQUEST);
        assert!(
            m.starts_with("key glob \"a b\": expected a key glob"),
            "{m}"
        );
        let (c, m) = refused(r#"{"op":"status","x":1}"#);
        assert_eq!(c, code::BAD_REQUEST);
        assert!(m.starts_with("malformed request: unknown field `x`"), "{m}");
        let (c, m) = refused("{nope");
        assert_eq!(c, code::BAD_REQUEST);
        assert!(m.starts_with("invalid JSON: "), "{m}");
    }

    #[test]
    fn fields_an_op_does_not_take_are_ignored_and_a_missing_ok_is_a_failure() {
        assert_eq!(
            Request::parse(br#"{"op":"status","key":"a","limit":2}"#).unwrap(),
            Request::Status
        );
        let Request::Ack(ack) = Request::parse(br#"{"op":"ack","id":1}"#).unwrap() else {
            panic!("not an ack");
        };
        assert_eq!(
            ack.result(),
            Err("the watching program reported a failure".into())
        );
    }
}
