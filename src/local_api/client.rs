//! The client side of the local socket, used by the CLI (`report`, `status`, `get`) and by
//! benchmarks. `report --stdin` streams: it groups input lines into requests and keeps up to
//! [`STREAM_WINDOW`] requests in flight, so memory stays flat however long the input is.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use thiserror::Error;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::local_api::protocol::{MAX_LINE, REPORT_CLOSE, REPORT_OPEN, Request, code};
use crate::model::change::RawChange;

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
    #[error(
        "daemon not reachable at {path}: no answer within {after:?} (is edgesync stalled? \
         local.client_timeout sets how long to wait)"
    )]
    NoAnswer { path: PathBuf, after: Duration },
    #[error("{code}: {message}")]
    Rejected { code: String, message: String },
    #[error("connection to the daemon failed: {0}")]
    Io(#[from] io::Error),
    #[error("unexpected reply from the daemon: {0}")]
    Protocol(String),
}

impl ClientError {
    /// Exit code of docs/PROTOCOL.md §2.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Unreachable { .. } | ClientError::NoAnswer { .. } => 3,
            // `failed`: the request was valid but did not work out (e.g. a rollback's handler).
            ClientError::Rejected { code: c, .. } if c != code::IO_ERROR && c != code::FAILED => 4,
            _ => 1,
        }
    }
}

/// How long a client waits for the daemon: to connect, and for each answer (a streamed
/// report waits this long for every answer, not for the whole run). `local.client_timeout`.
pub const DEFAULT_TIMEOUT: Duration = crate::config::DEFAULT_CLIENT_TIMEOUT;
/// A streamed report whose input is quiet sends an empty line this often, so that the
/// daemon does not close the connection as idle (`local.idle_timeout` is at least 1s).
const KEEPALIVE: Duration = Duration::from_millis(500);

/// One connection to the daemon.
#[derive(Debug)]
pub struct Client {
    reader: BufReader<OwnedReadHalf>,
    writer: BufWriter<OwnedWriteHalf>,
    line: String,
    path: PathBuf,
    timeout: Duration,
}

/// Runs `fut`, turning a wait longer than `after` into [`ClientError::NoAnswer`].
async fn answer_within<T>(
    path: &Path,
    after: Duration,
    fut: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    tokio::time::timeout(after, fut).await.unwrap_or_else(|_| {
        Err(ClientError::NoAnswer {
            path: path.to_path_buf(),
            after,
        })
    })
}

impl Client {
    /// Connects with [`DEFAULT_TIMEOUT`].
    pub async fn connect(path: &Path) -> Result<Client, ClientError> {
        Self::connect_timeout(path, DEFAULT_TIMEOUT).await
    }

    /// Connects; `timeout` bounds the connect and then every answer.
    pub async fn connect_timeout(path: &Path, timeout: Duration) -> Result<Client, ClientError> {
        let connecting = tokio::time::timeout(timeout, UnixStream::connect(path))
            .await
            .unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connect timed out after {timeout:?}"),
                ))
            });
        let stream = connecting.map_err(|e| {
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
            path: path.to_path_buf(),
            timeout,
        })
    }

    /// Sends one request and waits for its reply; `{"ok": false}` becomes an error.
    pub async fn call(&mut self, request: &Request) -> Result<Value, ClientError> {
        let after = self.timeout;
        self.call_within(request, after).await
    }

    /// Like [`Client::call`], waiting up to `after` (e.g. a rollback runs a handler).
    pub async fn call_within(
        &mut self,
        request: &Request,
        after: Duration,
    ) -> Result<Value, ClientError> {
        let line = request
            .to_line()
            .map_err(|e| ClientError::Protocol(format!("cannot encode the request: {e}")))?;
        let path = self.path.clone();
        answer_within(&path, after, async {
            self.send_raw(line.as_bytes()).await?;
            self.writer.flush().await?;
            self.recv().await
        })
        .await
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

/// A streamed report that stopped early. Every change of the input before `line` was
/// queued, unless the daemon refused a request (then `queued` says how many were).
#[derive(Debug, Error)]
#[error(
    "{error}{}; {queued} change(s) were queued before it{}",
    line.map(|l| format!(" (input line {l})")).unwrap_or_default(),
    if *queued_after > 0 { format!(", and {queued_after} after it that were already under way") } else { String::new() }
)]
pub struct StreamError {
    /// Changes durably queued before the failure.
    pub queued: u64,
    /// Changes after the failing line that were queued anyway (requests already in flight).
    pub queued_after: u64,
    /// 1-based input line at fault, when known.
    pub line: Option<u64>,
    pub error: ClientError,
}

/// One request in flight: the input lines it carries.
struct Sent {
    /// Line number of each change in the request.
    lines: Vec<u64>,
}

/// What the answers said.
#[derive(Default)]
struct Answers {
    out: StreamOutcome,
    /// The first refusal: the input line at fault and the error.
    first_error: Option<(Option<u64>, ClientError)>,
    queued_after: u64,
}

/// Streams NDJSON changes (`{"key":..,"value":..}` a line) from `input` to the daemon.
///
/// Each line is validated here first (JSON, key, value size), so a bad line stops the
/// stream with every line before it queued and none after it. Lines are grouped into
/// requests of up to [`STREAM_BATCH`] changes (fewer when input is slow, so an interactive
/// producer is not held back) and up to [`STREAM_WINDOW`] requests are pipelined. When the
/// daemon refuses a request (e.g. `store-full`), no further request is sent.
pub async fn report_stream<R: AsyncBufRead + Unpin>(
    path: &Path,
    input: R,
) -> Result<StreamOutcome, StreamError> {
    report_stream_within(path, input, DEFAULT_TIMEOUT).await
}

/// [`report_stream`] with another timeout for connecting and for each answer.
pub async fn report_stream_within<R: AsyncBufRead + Unpin>(
    path: &Path,
    mut input: R,
    timeout: Duration,
) -> Result<StreamOutcome, StreamError> {
    let client = Client::connect_timeout(path, timeout)
        .await
        .map_err(|e| StreamError {
            queued: 0,
            queued_after: 0,
            line: None,
            error: e,
        })?;
    let Client {
        mut reader,
        mut writer,
        ..
    } = client;
    let (tx, mut rx) = mpsc::channel::<Sent>(STREAM_WINDOW);
    let refused = Arc::new(AtomicBool::new(false));

    // Reads answers in order while the sender keeps writing; each within `timeout` of the
    // previous one (or of its request), so a long run that makes progress never times out.
    let refused_flag = Arc::clone(&refused);
    let socket = path.to_path_buf();
    let answers = tokio::spawn(async move {
        let mut a = Answers::default();
        let mut line = String::new();
        while let Some(sent) = rx.recv().await {
            line.clear();
            let reply = answer_within(&socket, timeout, async {
                match reader.read_line(&mut line).await {
                    Ok(0) => Err(ClientError::Protocol(
                        "the daemon closed the connection".into(),
                    )),
                    Ok(_) => Ok(()),
                    Err(e) => Err(e.into()),
                }
            })
            .await
            .and_then(|()| parse_reply(&line));
            let n = sent.lines.len() as u64;
            match reply {
                Ok(v) if a.first_error.is_none() => {
                    a.out.queued += n;
                    a.out.first_seq = a
                        .out
                        .first_seq
                        .or(v.get("first_seq").and_then(Value::as_u64));
                    a.out.last_seq = v.get("last_seq").and_then(Value::as_u64).or(a.out.last_seq);
                }
                Ok(_) => a.queued_after += n,
                Err(e) => {
                    refused_flag.store(true, Ordering::SeqCst);
                    let broken = matches!(
                        e,
                        ClientError::Io(_)
                            | ClientError::Protocol(_)
                            | ClientError::NoAnswer { .. }
                    );
                    if a.first_error.is_none() {
                        let at = error_index(&e)
                            .and_then(|i| sent.lines.get(i).copied())
                            .or(sent.lines.first().copied());
                        a.first_error = Some((at, e));
                    }
                    if broken {
                        break;
                    }
                }
            }
        }
        a
    });

    let mut req: Vec<u8> = Vec::with_capacity(STREAM_BATCH_BYTES + 1024);
    let mut batch: Vec<u64> = Vec::with_capacity(STREAM_BATCH);
    let mut lineno = 0u64;
    let mut line = String::new();
    let mut local_error: Option<(Option<u64>, ClientError)> = None;
    loop {
        if refused.load(Ordering::SeqCst) {
            break;
        }
        // Quiet input: keep the connection from being closed as idle.
        loop {
            match tokio::time::timeout(KEEPALIVE, input.fill_buf()).await {
                Ok(_) => break,
                Err(_) if refused.load(Ordering::SeqCst) => break,
                Err(_) => {
                    if let Err(e) = keepalive(&mut writer).await {
                        local_error = Some((None, e));
                        break;
                    }
                }
            }
        }
        if local_error.is_some() || refused.load(Ordering::SeqCst) {
            break;
        }
        line.clear();
        let eof = match input.read_line(&mut line).await {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => {
                local_error = Some((Some(lineno + 1), e.into()));
                break;
            }
        };
        if !eof {
            lineno += 1;
            let text = line.trim();
            if text.is_empty() {
                continue;
            }
            if let Err(e) = check_line(text) {
                local_error = Some((Some(lineno), e));
                break;
            }
            if !batch.is_empty()
                && req.len() + text.len() > STREAM_BATCH_BYTES
                && let Err(e) = send_request(&mut writer, &mut req, &tx, &mut batch).await
            {
                local_error = Some((None, e));
                break;
            }
            if batch.is_empty() {
                req.extend_from_slice(REPORT_OPEN);
            } else {
                req.push(b',');
            }
            req.extend_from_slice(text.as_bytes());
            batch.push(lineno);
        }
        // Send when the batch is full, at EOF, or when no more input comes at once (within
        // KEEPALIVE: the daemon must see the request before it closes the connection as idle).
        let idle = match tokio::time::timeout(KEEPALIVE, input.fill_buf()).await {
            Ok(more) => more.map(|b| b.is_empty()).unwrap_or(true),
            Err(_) => true,
        };
        if !batch.is_empty() && (eof || idle || batch.len() >= STREAM_BATCH) {
            if let Err(e) = send_request(&mut writer, &mut req, &tx, &mut batch).await {
                local_error = Some((None, e));
                break;
            }
            if idle {
                let _ = writer.flush().await;
            }
        }
        if eof {
            break;
        }
    }
    // The lines before a bad one still go; then everything sent must reach the daemon.
    if !batch.is_empty()
        && !refused.load(Ordering::SeqCst)
        && let Err(e) = send_request(&mut writer, &mut req, &tx, &mut batch).await
    {
        local_error = local_error.or(Some((None, e)));
    }
    if let Err(e) = writer.flush().await {
        local_error = local_error.or(Some((None, e.into())));
    }
    drop(tx);
    let a = answers.await.map_err(|e| StreamError {
        queued: 0,
        queued_after: 0,
        line: None,
        error: ClientError::Protocol(e.to_string()),
    })?;
    // The daemon's refusal came first in the input if there was one.
    match a.first_error.or(local_error) {
        None => Ok(a.out),
        Some((line, error)) => Err(StreamError {
            queued: a.out.queued,
            queued_after: a.queued_after,
            line,
            error,
        }),
    }
}

/// An empty line: the daemon skips it, and it shows the connection is in use.
async fn keepalive(writer: &mut BufWriter<OwnedWriteHalf>) -> Result<(), ClientError> {
    writer.write_all(b"\n").await?;
    writer.flush().await?;
    Ok(())
}

/// Validates one input line as a change, as the daemon will.
fn check_line(text: &str) -> Result<(), ClientError> {
    let raw: RawChange = serde_json::from_str(text).map_err(|e| ClientError::Rejected {
        code: code::BAD_REQUEST.into(),
        message: format!("not a change {{\"key\": ..., \"value\": ...}}: {e}"),
    })?;
    raw.validate().map_err(|e| ClientError::Rejected {
        code: code::INVALID_CHANGE.into(),
        message: e.to_string(),
    })?;
    Ok(())
}

async fn send_request(
    writer: &mut BufWriter<OwnedWriteHalf>,
    req: &mut Vec<u8>,
    tx: &mpsc::Sender<Sent>,
    batch: &mut Vec<u64>,
) -> Result<(), ClientError> {
    req.extend_from_slice(REPORT_CLOSE);
    req.push(b'\n');
    let r = writer.write_all(req).await;
    req.clear();
    let lines = std::mem::take(batch);
    r?;
    // The answer reader is gone only after the connection broke; that error is reported.
    let _ = tx.send(Sent { lines }).await;
    Ok(())
}

/// The change index N of an "change N: ..." error message.
fn error_index(e: &ClientError) -> Option<usize> {
    match e {
        ClientError::Rejected { message, .. } => message
            .strip_prefix("change ")
            .map(|rest| {
                rest.chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
            })
            .and_then(|n| n.parse().ok()),
        _ => None,
    }
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
    fn change_index_is_read_from_the_error() {
        let e = ClientError::Rejected {
            code: "invalid-change".into(),
            message: "change 3: key \"a b\" is invalid".into(),
        };
        assert_eq!(error_index(&e), Some(3));
        let e = ClientError::Rejected {
            code: "store-full".into(),
            message: "store is full".into(),
        };
        assert_eq!(error_index(&e), None);
    }

    #[test]
    fn lines_are_checked_like_the_daemon_does() {
        assert!(check_line(r#"{"key":"a","value":1}"#).is_ok());
        assert!(check_line(r#"{"key":"a","value":null}"#).is_ok());
        for bad in [
            r#"{"key":"a b","value":1}"#,
            r#"{"key":"a"}"#,
            "[1]",
            "nope",
            r#"{"key":"a","value":1,"x":2}"#,
        ] {
            assert!(check_line(bad).is_err(), "{bad}");
        }
    }
}
