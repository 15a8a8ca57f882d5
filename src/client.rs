//! The client side of the local socket, used by the CLI (`report`, `status`, `get`) and by
//! benchmarks. `report --stdin` streams: it groups input lines into requests and keeps up to
//! [`STREAM_WINDOW`] requests in flight, so memory stays flat however long the input is.

use std::io;
use std::path::{Path, PathBuf};

use serde_json::Value;
use thiserror::Error;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;

use crate::local_api::MAX_LINE;

/// Requests `report --stdin` keeps in flight.
pub const STREAM_WINDOW: usize = 64;
/// Most changes it puts into one request.
pub const STREAM_BATCH: usize = 1000;
/// Largest request it builds (well under the server's line limit).
const STREAM_BATCH_BYTES: usize = MAX_LINE / 2;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("daemon not reachable at {path}: {reason} ({hint})")]
    Unreachable {
        path: PathBuf,
        reason: String,
        hint: &'static str,
    },
    #[error("{code}: {message}")]
    Rejected { code: String, message: String },
    #[error("connection to the daemon failed: {0}")]
    Io(#[from] io::Error),
    #[error("unexpected reply from the daemon: {0}")]
    Protocol(String),
}

impl ClientError {
    /// Exit code of SPEC §2.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Unreachable { .. } => 3,
            ClientError::Rejected { code, .. } if code != "io-error" => 4,
            _ => 1,
        }
    }
}

/// One connection to the daemon.
#[derive(Debug)]
pub struct Client {
    reader: BufReader<OwnedReadHalf>,
    writer: BufWriter<OwnedWriteHalf>,
    line: String,
}

impl Client {
    pub async fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).await.map_err(|e| {
            let hint = match e.kind() {
                io::ErrorKind::PermissionDenied => {
                    "is your user in the group that owns the socket?"
                }
                _ => "is edgesync.service running?",
            };
            ClientError::Unreachable {
                path: path.to_path_buf(),
                reason: io_reason(&e),
                hint,
            }
        })?;
        let (r, w) = stream.into_split();
        Ok(Client {
            reader: BufReader::with_capacity(64 * 1024, r),
            writer: BufWriter::with_capacity(64 * 1024, w),
            line: String::new(),
        })
    }

    /// Sends one request and waits for its reply; `{"ok": false}` becomes an error.
    pub async fn call(&mut self, request: &Value) -> Result<Value, ClientError> {
        self.send_raw(request.to_string().as_bytes()).await?;
        self.writer.flush().await?;
        self.recv().await
    }

    async fn send_raw(&mut self, line: &[u8]) -> Result<(), ClientError> {
        self.writer.write_all(line).await?;
        self.writer.write_all(b"\n").await?;
        Ok(())
    }

    async fn recv(&mut self) -> Result<Value, ClientError> {
        self.line.clear();
        let n = self.reader.read_line(&mut self.line).await?;
        if n == 0 {
            return Err(ClientError::Protocol(
                "the daemon closed the connection".into(),
            ));
        }
        parse_reply(&self.line)
    }
}

fn io_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => "no such socket".into(),
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

/// Parses a reply line; `{"ok":false,...}` becomes [`ClientError::Rejected`].
pub fn parse_reply(line: &str) -> Result<Value, ClientError> {
    let v: Value = serde_json::from_str(line.trim_end())
        .map_err(|e| ClientError::Protocol(format!("{e}: {}", line.trim_end())))?;
    if v.get("ok").and_then(Value::as_bool) == Some(true) {
        return Ok(v);
    }
    let err = v.get("error");
    let field = |name: &str| {
        err.and_then(|e| e.get(name))
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_owned()
    };
    Err(ClientError::Rejected {
        code: field("code"),
        message: field("message"),
    })
}

/// What a streamed report achieved.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StreamOutcome {
    pub queued: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
}

/// A streamed report that stopped early.
#[derive(Debug, Error)]
#[error("{error}{}", line.map(|l| format!(" (input line {l})")).unwrap_or_default())]
pub struct StreamError {
    /// Changes durably queued before the failure.
    pub queued: u64,
    /// 1-based input line at fault, when known.
    pub line: Option<u64>,
    pub error: ClientError,
}

/// One request in flight: the input lines it carries.
struct Sent {
    first_line: u64,
    lines: u64,
}

/// Streams NDJSON changes (`{"key":..,"value":..}` a line) from `input` to the daemon.
/// Lines are checked to be JSON, grouped into requests of up to [`STREAM_BATCH`] changes
/// (fewer when input is slow, so an interactive producer is not held back) and pipelined.
pub async fn report_stream<R: AsyncBufRead + Unpin>(
    path: &Path,
    mut input: R,
) -> Result<StreamOutcome, StreamError> {
    let fail = |queued, line, error| StreamError {
        queued,
        line,
        error,
    };
    let client = Client::connect(path).await.map_err(|e| fail(0, None, e))?;
    let Client {
        mut reader,
        mut writer,
        ..
    } = client;
    let (tx, mut rx) = mpsc::channel::<Sent>(STREAM_WINDOW);

    // Reads answers in order while the sender keeps writing.
    let answers = tokio::spawn(async move {
        let mut out = StreamOutcome::default();
        let mut line = String::new();
        while let Some(sent) = rx.recv().await {
            line.clear();
            let n = reader.read_line(&mut line).await;
            let n = match n {
                Ok(n) => n,
                Err(e) => return Err(fail(out.queued, None, e.into())),
            };
            if n == 0 {
                let e = ClientError::Protocol("the daemon closed the connection".into());
                return Err(fail(out.queued, None, e));
            }
            match parse_reply(&line) {
                Ok(v) => {
                    out.queued += sent.lines;
                    out.first_seq = out.first_seq.or(v.get("first_seq").and_then(Value::as_u64));
                    out.last_seq = v.get("last_seq").and_then(Value::as_u64).or(out.last_seq);
                }
                Err(e) => {
                    let line = error_line_number(&e, &sent);
                    return Err(fail(out.queued, Some(line), e));
                }
            }
        }
        Ok(out)
    });

    let mut req: Vec<u8> = Vec::with_capacity(STREAM_BATCH_BYTES + 1024);
    let mut batch_lines = 0u64;
    let mut first_line = 1u64;
    let mut lineno = 0u64;
    let mut line = String::new();
    let sent = loop {
        line.clear();
        let eof = match input.read_line(&mut line).await {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => break Err(fail(0, Some(lineno + 1), e.into())),
        };
        if !eof {
            lineno += 1;
            let text = line.trim();
            if text.is_empty() {
                if batch_lines == 0 {
                    first_line = lineno + 1;
                }
                continue;
            }
            if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(text) {
                let e = ClientError::Rejected {
                    code: "bad-request".into(),
                    message: format!("invalid JSON: {e}"),
                };
                break Err(fail(0, Some(lineno), e));
            }
            if batch_lines > 0 && req.len() + text.len() > STREAM_BATCH_BYTES {
                if let Err(e) =
                    flush_request(&mut writer, &mut req, &tx, first_line, batch_lines).await
                {
                    break Err(e);
                }
                first_line = lineno;
                batch_lines = 0;
            }
            if batch_lines == 0 {
                req.extend_from_slice(b"{\"op\":\"report\",\"changes\":[");
            } else {
                req.push(b',');
            }
            req.extend_from_slice(text.as_bytes());
            batch_lines += 1;
        }
        // Send when the batch is full, at EOF, or when more input is not already buffered.
        let idle = input.fill_buf().await.map(|b| b.is_empty()).unwrap_or(true);
        if batch_lines > 0 && (eof || idle || batch_lines >= STREAM_BATCH as u64) {
            if let Err(e) = flush_request(&mut writer, &mut req, &tx, first_line, batch_lines).await
            {
                break Err(e);
            }
            first_line = lineno + 1;
            batch_lines = 0;
            if idle && !eof {
                let _ = writer.flush().await;
            }
        }
        if eof {
            break writer.flush().await.map_err(|e| fail(0, None, e.into()));
        }
    };
    // Requests already handed to the answer reader must reach the daemon, else it waits forever.
    let _ = writer.flush().await;
    drop(tx);
    let answered = answers
        .await
        .map_err(|e| fail(0, None, ClientError::Protocol(e.to_string())))?;
    match (sent, answered) {
        // An answer's error is the more precise one.
        (_, Err(e)) => Err(e),
        (Err(mut e), Ok(out)) => {
            e.queued = out.queued;
            Err(e)
        }
        (Ok(()), Ok(out)) => Ok(out),
    }
}

async fn flush_request(
    writer: &mut BufWriter<OwnedWriteHalf>,
    req: &mut Vec<u8>,
    tx: &mpsc::Sender<Sent>,
    first_line: u64,
    lines: u64,
) -> Result<(), StreamError> {
    req.extend_from_slice(b"]}\n");
    let r = writer.write_all(req).await;
    req.clear();
    if let Err(e) = r {
        return Err(StreamError {
            queued: 0,
            line: None,
            error: e.into(),
        });
    }
    // The answer reader is gone only after it saw an error; that error is reported.
    let _ = tx.send(Sent { first_line, lines }).await;
    Ok(())
}

/// Maps "change N: ..." in an error back to the input line.
fn error_line_number(e: &ClientError, sent: &Sent) -> u64 {
    let index = match e {
        ClientError::Rejected { message, .. } => message
            .strip_prefix("change ")
            .map(|rest| {
                rest.chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
            })
            .and_then(|n| n.parse::<u64>().ok()),
        _ => None,
    };
    sent.first_line + index.unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_map_to_errors_and_exit_codes() {
        assert!(parse_reply("{\"ok\":true,\"first_seq\":1}\n").is_ok());
        let e =
            parse_reply(r#"{"ok":false,"error":{"code":"store-full","message":"m"}}"#).unwrap_err();
        assert_eq!(e.exit_code(), 4);
        let e =
            parse_reply(r#"{"ok":false,"error":{"code":"io-error","message":"m"}}"#).unwrap_err();
        assert_eq!(e.exit_code(), 1);
        assert!(matches!(
            parse_reply("garbage").unwrap_err(),
            ClientError::Protocol(_)
        ));
    }

    #[test]
    fn change_index_maps_to_input_line() {
        let sent = Sent {
            first_line: 10,
            lines: 5,
        };
        let e = ClientError::Rejected {
            code: "invalid-change".into(),
            message: "change 3: key \"a b\" is invalid".into(),
        };
        assert_eq!(error_line_number(&e, &sent), 13);
    }
}
