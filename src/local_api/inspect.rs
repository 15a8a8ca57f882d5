//! Queue inspection, read only (issue 5 point 7): `edgesync queue stats`, `queue peek` and
//! `queue export`, so that an operator on site can see and save a backlog.
//!
//! # Two ways in
//! - **Through the daemon** when it answers on its socket: the redb file is locked by the
//!   running daemon, so the socket op `{"op":"queue","what":"stats"}` or
//!   `{"op":"queue","what":"peek","from":S,"limit":N}` reads it there (one read transaction
//!   per request, off the async threads). A page holds at most [`PAGE_MAX`] changes and
//!   about [`PAGE_BYTES`] of records and says where the next one starts, so `export` pages
//!   through any backlog with flat memory. While the daemon runs the queue moves: `export`
//!   stops at the newest change queued when it began, and changes acknowledged while it
//!   pages are missing from the later pages (they are gone, which is the point of the queue).
//! - **Directly from the file** when the daemon is not reachable: the store named by the
//!   config (read leniently, see [`config::store_location`]) is opened read-only with redb;
//!   one read transaction is one consistent snapshot. A file left unclean by a crash cannot
//!   be opened read-only (redb must repair it, which needs a writer): the error says to
//!   start the daemon, which repairs it, and to ask again.
//!
//! Nothing here writes to the store. The reader knows the outbox's layout (`outbox`:
//! seq → record, `meta`: counters; see [`crate::store`]).

use std::io;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

use redb::{ReadOnlyDatabase, ReadTransaction, ReadableDatabase, ReadableTable};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use thiserror::Error;

use crate::config;
use crate::local_api::client::{Client, ClientError};
use crate::local_api::protocol::{QueueQuery, Request};
use crate::model::text::utc;
use crate::store::tables::OUTBOX;
use crate::store::{Meta, Outbox, StoreError, record};

/// Changes `peek` shows by default.
pub const DEFAULT_PEEK: usize = 20;
/// Most changes in one page.
pub const PAGE_MAX: usize = 1000;
/// Record bytes after which a page ends (it holds at least one change).
pub const PAGE_BYTES: usize = 512 * 1024;

/// The queue at a glance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub depth: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    pub next_seq: u64,
    pub oldest: Option<End>,
    pub newest: Option<End>,
    pub counters: Counters,
    /// Bytes of `max_bytes` held by the latest values and the desired state (0 for a store
    /// of an earlier version until the agent has opened it once).
    #[serde(default)]
    pub state_bytes: u64,
}

/// The oldest or newest queued change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct End {
    pub seq: u64,
    pub ts: u64,
    pub age_ms: u64,
}

/// The store's persistent counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub reported: u64,
    pub acked: u64,
    pub dropped: u64,
    pub rejected: u64,
}

/// One queued change; an NDJSON line of `export`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    pub key: String,
    pub value: Value,
    pub ts: u64,
    /// `cloud` or `rollback` for changes the agent made; absent for the device's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

/// Changes in seq order, and the seq the next page starts at (`None`: nothing after them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Page {
    pub changes: Vec<Entry>,
    pub next: Option<u64>,
}

#[derive(Debug, Error)]
pub enum InspectError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(
        "{daemon}; and there is no store at {}: nothing was ever queued with this \
         config (or --config names another agent's)", path.display()
    )]
    NoStore { daemon: String, path: PathBuf },
    #[error(
        "{daemon}; but the store {} is in use: a running edgesync holds \
         it; make its socket reachable (check local.socket and your permissions on it)",
        path.display()
    )]
    Locked { daemon: String, path: PathBuf },
    #[error(
        "{daemon}; and the store {} was not closed cleanly (the daemon \
         crashed or was killed): it must be repaired before it can be read, which only a writer \
         may do; start the daemon (it repairs the store at start) and ask again",
        path.display()
    )]
    Unclean { daemon: String, path: PathBuf },
    #[error("{daemon}; and the store {} cannot be read: {detail}", path.display())]
    Open {
        daemon: String,
        path: PathBuf,
        detail: String,
    },
    #[error("reading the store: {0}")]
    Read(String),
    #[error("writing the output: {0}")]
    Write(io::Error),
    #[error("cannot write {}: {source}", path.display())]
    File { path: PathBuf, source: io::Error },
    #[error("unexpected reply from the daemon: {0}")]
    Protocol(String),
    /// The daemon's store failed (answering `queue`).
    #[error(transparent)]
    Store(StoreError),
    #[error(transparent)]
    Encode(serde_json::Error),
}

impl InspectError {
    /// Exit code of docs/PROTOCOL.md §2.
    pub fn exit_code(&self) -> u8 {
        match self {
            InspectError::Client(e) => e.exit_code(),
            InspectError::Locked { .. } => 3,
            _ => 1,
        }
    }
}

impl From<redb::Error> for InspectError {
    fn from(e: redb::Error) -> Self {
        InspectError::Read(e.to_string())
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for InspectError {
            fn from(e: $t) -> Self { InspectError::from(redb::Error::from(e)) }
        }
    )*};
}
from_redb!(redb::StorageError, redb::TableError, redb::TransactionError);

// ---------------------------------------------------------------------------------------------
// Reading, from any read transaction (the daemon's or a read-only database's).

/// The queue figures of one snapshot.
pub fn summary(
    txn: &ReadTransaction,
    max_bytes: u64,
    now_ms: u64,
) -> Result<Summary, InspectError> {
    let Meta {
        next_seq,
        depth,
        bytes,
        reported,
        acked,
        dropped,
        rejected,
        state_bytes,
        ..
    } = Meta::read(txn)?;
    let (oldest, newest) = match txn.open_table(OUTBOX) {
        Ok(t) => {
            let end = |item: Option<(redb::AccessGuard<u64>, redb::AccessGuard<&[u8]>)>| {
                item.map(|(k, v)| {
                    let ts = record::decode(v.value()).map_or(0, |r| r.ts);
                    End {
                        seq: k.value(),
                        ts,
                        age_ms: now_ms.saturating_sub(ts),
                    }
                })
            };
            (end(t.first()?), end(t.last()?))
        }
        Err(redb::TableError::TableDoesNotExist(_)) => (None, None),
        Err(e) => return Err(e.into()),
    };
    Ok(Summary {
        depth,
        bytes,
        max_bytes,
        next_seq: next_seq.max(1),
        oldest,
        newest,
        counters: Counters {
            reported,
            acked,
            dropped,
            rejected,
        },
        state_bytes,
    })
}

fn entry(seq: u64, rec: &[u8]) -> Result<Entry, InspectError> {
    let r = record::decode(rec).map_err(|e| InspectError::Read(format!("change {seq}: {e}")))?;
    let value = crate::model::change::decode_value(r.value)
        .map_err(|e| InspectError::Read(format!("change {seq}: bad value: {e}")))?;
    Ok(Entry {
        seq,
        key: r.key.to_owned(),
        value,
        ts: r.ts,
        origin: r.origin.map(str::to_owned),
    })
}

/// Up to `limit` changes from seq `from` on (fewer when their records pass `max_bytes`, but
/// at least one when any is there).
pub fn page(
    txn: &ReadTransaction,
    from: u64,
    limit: usize,
    max_bytes: usize,
) -> Result<Page, InspectError> {
    let table = match txn.open_table(OUTBOX) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => {
            return Ok(Page {
                changes: Vec::new(),
                next: None,
            });
        }
        Err(e) => return Err(e.into()),
    };
    let mut changes = Vec::new();
    let mut bytes = 0usize;
    for item in table.range(from..)? {
        let (k, v) = item?;
        let rec = v.value();
        if changes.len() >= limit || (!changes.is_empty() && bytes + rec.len() > max_bytes) {
            return Ok(Page {
                changes,
                next: Some(k.value()),
            });
        }
        bytes += rec.len();
        changes.push(entry(k.value(), rec)?);
    }
    Ok(Page {
        changes,
        next: None,
    })
}

/// Calls `f` with up to `limit` changes from seq `from` on, in order, in one snapshot.
pub fn each(
    txn: &ReadTransaction,
    from: u64,
    limit: usize,
    mut f: impl FnMut(&Entry) -> io::Result<()>,
) -> Result<(), InspectError> {
    let table = match txn.open_table(OUTBOX) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    for item in table.range(from..)?.take(limit) {
        let (k, v) = item?;
        f(&entry(k.value(), v.value())?).map_err(InspectError::Write)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The daemon's side: the socket op `queue`.

/// Answers a `queue` request: `stats` (→ `{"queue": Summary}`) or `peek` (→ `{"changes":
/// [...], "next": S|null}`; `from` defaults to 0, `limit` to [`DEFAULT_PEEK`] and is capped
/// at [`PAGE_MAX`]). Blocking (one read transaction). An error is the daemon's `io-error`.
pub fn answer_query(outbox: &Outbox, query: QueueQuery) -> Result<Value, InspectError> {
    let txn = outbox.read().map_err(InspectError::Store)?;
    match query {
        QueueQuery::Stats => {
            let now = crate::model::change::now_ms();
            let s = summary(&txn, outbox.stats().max_bytes, now)?;
            Ok(json!({ "queue": s }))
        }
        QueueQuery::Peek { from, limit } => {
            let limit = limit.unwrap_or(DEFAULT_PEEK).min(PAGE_MAX);
            let p = page(&txn, from.unwrap_or(0), limit, PAGE_BYTES)?;
            serde_json::to_value(p).map_err(InspectError::Encode)
        }
    }
}

/// [`answer_query`] for the fields of a `queue` request; `Err((code, message))` with a
/// docs/PROTOCOL.md §6 code.
#[cfg(test)]
pub fn answer(
    outbox: &Outbox,
    what: Option<&str>,
    from: Option<u64>,
    limit: Option<usize>,
) -> Result<Value, (&'static str, String)> {
    let query =
        QueueQuery::from_fields(what, from, limit).map_err(|e| (e.code(), e.to_string()))?;
    answer_query(outbox, query)
        .map_err(|e| (crate::local_api::protocol::code::IO_ERROR, e.to_string()))
}

// ---------------------------------------------------------------------------------------------
// The CLI's side.

/// Where the CLI reads the queue from.
pub enum Source {
    Daemon {
        client: Client,
        socket: PathBuf,
    },
    File {
        db: ReadOnlyDatabase,
        path: PathBuf,
        max_bytes: u64,
    },
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Source {
    /// The daemon if it answers on the socket of `config`, else the store file, read-only.
    pub async fn open(config_path: &Path) -> Result<Source, InspectError> {
        let socket = config::socket_path(config_path);
        let daemon = match Client::connect(&socket).await {
            Ok(client) => return Ok(Source::Daemon { client, socket }),
            Err(e @ ClientError::Unreachable { .. }) => e.to_string(),
            Err(e) => return Err(e.into()),
        };
        let (path, max_bytes) = config::store_location(config_path);
        let db = open_read_only(&path, daemon)?;
        Ok(Source::File {
            db,
            path,
            max_bytes,
        })
    }

    /// Where the figures come from, for people.
    pub fn describe(&self) -> String {
        match self {
            Source::Daemon { socket, .. } => format!("the daemon at {}", socket.display()),
            Source::File { path, .. } => format!(
                "the store file {} (the daemon is not running)",
                path.display()
            ),
        }
    }

    pub async fn summary(&mut self) -> Result<Summary, InspectError> {
        match self {
            Source::Daemon { client, .. } => {
                let reply = client.call(&Request::Queue(QueueQuery::Stats)).await?;
                serde_json::from_value(reply.get("queue").cloned().unwrap_or_default())
                    .map_err(|e| InspectError::Protocol(e.to_string()))
            }
            Source::File {
                db,
                max_bytes,
                path,
            } => guarded(path, || {
                let txn = db.begin_read()?;
                summary(&txn, *max_bytes, crate::model::change::now_ms())
            }),
        }
    }

    /// One page of at most `limit` (≤ [`PAGE_MAX`]) changes from `from` on.
    pub async fn page(&mut self, from: u64, limit: usize) -> Result<Page, InspectError> {
        let limit = limit.min(PAGE_MAX);
        match self {
            Source::Daemon { client, .. } => {
                let peek = QueueQuery::Peek {
                    from: Some(from),
                    limit: Some(limit),
                };
                let mut reply = client.call(&Request::Queue(peek)).await?;
                if let Value::Object(m) = &mut reply {
                    m.remove("ok");
                }
                serde_json::from_value(reply).map_err(|e| InspectError::Protocol(e.to_string()))
            }
            Source::File { db, path, .. } => guarded(path, || {
                let txn = db.begin_read()?;
                page(&txn, from, limit, PAGE_BYTES)
            }),
        }
    }

    /// Calls `f` with up to `limit` changes from `from` on, page by page.
    pub async fn walk(
        &mut self,
        from: u64,
        limit: Option<usize>,
        mut f: impl FnMut(&Entry) -> io::Result<()>,
    ) -> Result<Walked, InspectError> {
        let mut walked = Walked::default();
        if let Source::File { db, path, .. } = self {
            // One snapshot, streamed.
            guarded(path, || {
                let txn = db.begin_read()?;
                each(&txn, from, limit.unwrap_or(usize::MAX), |e| {
                    walked.add(e);
                    f(e)
                })
            })?;
            return Ok(walked);
        }
        // Through the daemon: stop at what was newest when the walk began.
        let through = match limit {
            Some(_) => u64::MAX,
            None => match self.summary().await?.newest {
                Some(n) => n.seq,
                None => return Ok(walked),
            },
        };
        let mut next = Some(from);
        let mut left = limit.unwrap_or(usize::MAX);
        while let Some(from) = next {
            if left == 0 || from > through {
                break;
            }
            let p = self.page(from, left.min(PAGE_MAX)).await?;
            for e in &p.changes {
                if e.seq > through || left == 0 {
                    return Ok(walked);
                }
                left -= 1;
                walked.add(e);
                f(e).map_err(InspectError::Write)?;
            }
            next = p.next;
        }
        Ok(walked)
    }
}

/// What a walk went through.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Walked {
    pub count: u64,
    pub first: Option<u64>,
    pub last: Option<u64>,
}

impl Walked {
    fn add(&mut self, e: &Entry) {
        self.count += 1;
        self.first = self.first.or(Some(e.seq));
        self.last = Some(e.seq);
    }
}

/// Runs a read of the store file. redb panics on some damaged pages; in builds that unwind
/// that is an error here (exit 1 with the reason), not an "internal error" (exit 101).
fn guarded<T>(path: &Path, f: impl FnOnce() -> Result<T, InspectError>) -> Result<T, InspectError> {
    let what = format!("reading the store file {}", path.display());
    std::panic::catch_unwind(AssertUnwindSafe(|| crate::sys::fatal::during(what, f)))
        .unwrap_or_else(|_| {
            Err(InspectError::Read(format!(
                "the store file {} is damaged: redb failed on a damaged page; keep the file \
                 for inspection (changes before the damage may have been written above)",
                path.display()
            )))
        })
}

/// Opens the store read-only; errors say why it cannot be read and what to do.
fn open_read_only(path: &Path, daemon: String) -> Result<ReadOnlyDatabase, InspectError> {
    if !path.exists() {
        return Err(InspectError::NoStore {
            daemon,
            path: path.to_path_buf(),
        });
    }
    let builder = redb::Builder::new();
    // redb may panic on a file damaged outside of it; that must be an error here too.
    let what = format!(
        "reading the store file {} (it may be damaged)",
        path.display()
    );
    let opened = std::panic::catch_unwind(AssertUnwindSafe(|| {
        crate::sys::fatal::during(what, || builder.open_read_only(path))
    }));
    let path = path.to_path_buf();
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => {
            Err(InspectError::Locked { daemon, path })
        }
        Ok(Err(redb::DatabaseError::RepairAborted)) => Err(InspectError::Unclean { daemon, path }),
        Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Io(e))))
            if e.kind() == io::ErrorKind::WouldBlock =>
        {
            Err(InspectError::Locked { daemon, path })
        }
        Ok(Err(e)) => Err(InspectError::Open {
            daemon,
            path,
            detail: e.to_string(),
        }),
        Err(_) => Err(InspectError::Open {
            daemon,
            path,
            detail: "it is damaged (redb failed while reading it)".into(),
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// Output.

/// `stats` for people.
pub fn render_summary(s: &Summary, source: &str) -> String {
    use crate::model::text::{human_bytes, human_duration};
    let end = |e: &Option<End>| match e {
        Some(e) => format!(
            "seq {}, {} ({} ago)",
            e.seq,
            utc(e.ts),
            human_duration(e.age_ms)
        ),
        None => "-".to_owned(),
    };
    format!(
        "queue       {} changes, {} of {}\n\
         state       {} of {} (latest values, desired state)\n\
         oldest      {}\n\
         newest      {}\n\
         next seq    {}\n\
         counters    reported {} · acked {} · dropped {} · rejected {}\n\
         read from   {source}\n",
        s.depth,
        human_bytes(s.bytes),
        human_bytes(s.max_bytes),
        human_bytes(s.state_bytes),
        human_bytes(crate::store::state_allowance(s.max_bytes)),
        end(&s.oldest),
        end(&s.newest),
        s.next_seq,
        s.counters.reported,
        s.counters.acked,
        s.counters.dropped,
        s.counters.rejected,
    )
}

/// Longest value `peek` shows on its line (export has them whole).
const PEEK_VALUE_MAX: usize = 120;

/// One `peek` line: seq, time, key, value, origin.
pub fn peek_line(e: &Entry) -> String {
    let mut value = e.value.to_string();
    if value.len() > PEEK_VALUE_MAX {
        let total = value.len();
        let mut cut = PEEK_VALUE_MAX;
        while !value.is_char_boundary(cut) {
            cut -= 1;
        }
        value.truncate(cut);
        value.push_str(&format!("… ({total} bytes)"));
    }
    format!(
        "{:>8}  {}  {}  {}  {}",
        e.seq,
        utc(e.ts),
        e.key,
        value,
        e.origin.as_deref().unwrap_or("device")
    )
}

/// One NDJSON line (without newline).
pub fn ndjson_line(e: &Entry) -> String {
    serde_json::to_string(e).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// The commands.

/// Succeeds quietly when the reader of our output went away (`| head`).
fn quiet_pipe(r: Result<(), InspectError>) -> Result<(), InspectError> {
    match r {
        Err(InspectError::Write(e)) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

fn note_source(source: &Source) {
    if let Source::File { path, .. } = source {
        eprintln!(
            "edgesync: the daemon is not running; reading the store file {}",
            path.display()
        );
    }
}

/// `edgesync queue stats [--json]`.
pub async fn stats_command(config: &Path, as_json: bool) -> Result<(), InspectError> {
    let mut source = Source::open(config).await?;
    let s = source.summary().await?;
    let out = if as_json {
        let mut v = serde_json::to_value(&s).map_err(|e| InspectError::Protocol(e.to_string()))?;
        let from = match &source {
            Source::Daemon { .. } => "daemon",
            Source::File { .. } => "store-file",
        };
        v["source"] = json!(from);
        format!(
            "{}\n",
            serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string())
        )
    } else {
        render_summary(&s, &source.describe())
    };
    let mut stdout = io::stdout();
    quiet_pipe(
        io::Write::write_all(&mut stdout, out.as_bytes())
            .and_then(|()| io::Write::flush(&mut stdout))
            .map_err(InspectError::Write),
    )
}

/// `edgesync queue peek [--from SEQ] [--limit N] [--json]`: one line per change.
pub async fn peek_command(
    config: &Path,
    from: u64,
    limit: usize,
    as_json: bool,
) -> Result<(), InspectError> {
    let mut source = Source::open(config).await?;
    note_source(&source);
    let mut out = io::BufWriter::new(io::stdout());
    let r = source
        .walk(from, Some(limit), |e| {
            let line = if as_json {
                ndjson_line(e)
            } else {
                peek_line(e)
            };
            io::Write::write_all(&mut out, line.as_bytes())?;
            io::Write::write_all(&mut out, b"\n")
        })
        .await;
    // Nothing to show says so (NDJSON stays empty: zero lines).
    let r = match r {
        Ok(w) if w.count == 0 && !as_json => {
            let line = format!("queue empty (from seq {from})\n");
            io::Write::write_all(&mut out, line.as_bytes()).map_err(InspectError::Write)
        }
        other => other.map(|_| ()),
    };
    quiet_pipe(r).and_then(|()| quiet_pipe(io::Write::flush(&mut out).map_err(InspectError::Write)))
}

/// `edgesync queue export FILE|-`: every queued change as NDJSON, in seq order; a file is
/// written atomically (complete, or not at all).
pub async fn export_command(config: &Path, file: &Path) -> Result<(), InspectError> {
    let mut source = Source::open(config).await?;
    note_source(&source);
    let line = |out: &mut dyn io::Write, e: &Entry| -> io::Result<()> {
        out.write_all(ndjson_line(e).as_bytes())?;
        out.write_all(b"\n")
    };
    if file == Path::new("-") {
        let mut out = io::BufWriter::new(io::stdout());
        let r = source.walk(0, None, |e| line(&mut out, e)).await;
        return quiet_pipe(r.map(|_| ()))
            .and_then(|()| quiet_pipe(io::Write::flush(&mut out).map_err(InspectError::Write)));
    }
    let failed = |source: io::Error| InspectError::File {
        path: file.to_path_buf(),
        source,
    };
    let mut out = crate::sys::atomic_file::AtomicFile::create(file).map_err(failed)?;
    let walked = match source.walk(0, None, |e| line(&mut out, e)).await {
        Ok(w) => w,
        Err(InspectError::Write(e)) => return Err(failed(e)),
        Err(e) => return Err(e),
    };
    out.commit().map_err(failed)?;
    match (walked.first, walked.last) {
        (Some(a), Some(b)) => eprintln!(
            "edgesync: exported {} change(s), seq {a} to {b}, to {}",
            walked.count,
            file.display()
        ),
        _ => eprintln!(
            "edgesync: the queue is empty; wrote an empty {}",
            file.display()
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::change::{NewChange, Origin};
    use crate::store::{StoreOptions, WhenFull};

    #[test]
    fn times_are_shown_in_utc() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(1_764_150_000_123), "2025-11-26T09:40:00.123Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(utc(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
        assert!(!utc(u64::MAX).is_empty());
    }

    #[test]
    fn peek_lines_show_origin_and_cut_long_values() {
        let e = Entry {
            seq: 41,
            key: "temp".into(),
            value: json!(21.5),
            ts: 1_764_150_000_000,
            origin: None,
        };
        assert_eq!(
            peek_line(&e),
            "      41  2025-11-26T09:40:00.000Z  temp  21.5  device"
        );
        assert_eq!(
            ndjson_line(&e),
            r#"{"seq":41,"key":"temp","value":21.5,"ts":1764150000000}"#
        );
        let long = Entry {
            value: json!("é".repeat(200)),
            origin: Some("cloud".into()),
            ..e
        };
        let line = peek_line(&long);
        assert!(line.ends_with("bytes)  cloud"), "{line}");
        assert!(line.len() < 220, "{line}");
        assert!(ndjson_line(&long).ends_with(r#","origin":"cloud"}"#));
    }

    fn change(key: &str, v: Value, origin: Origin) -> NewChange {
        NewChange {
            key: key.into(),
            value: crate::model::change::encode_value(key, &v).unwrap(),
            ts: Some(1_000),
            origin,
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn pages_summaries_and_the_daemon_answer_read_the_outbox() {
        let dir = tempfile::tempdir().unwrap();
        let opts = StoreOptions {
            path: dir.path().join("s.redb"),
            max_bytes: 1 << 20,
            when_full: WhenFull::Reject,
            cache_size: 1 << 20,
        };
        let outbox = Outbox::open(&opts).unwrap();
        let empty = answer(&outbox, Some("stats"), None, None).unwrap();
        assert_eq!(empty["queue"]["depth"], 0);
        assert_eq!(empty["queue"]["oldest"], Value::Null);
        assert_eq!(empty["queue"]["next_seq"], 1);
        let mut changes: Vec<NewChange> = (0..25)
            .map(|i| change(&format!("k{i}"), json!({"n": i}), Origin::Device))
            .collect();
        changes.push(change("led", json!("on"), Origin::Cloud));
        outbox.append(changes).await.unwrap();
        outbox.ack(crate::store::Ack::Through(2)).await.unwrap();

        let txn = outbox.read().unwrap();
        let s = summary(&txn, 1 << 20, 3_000).unwrap();
        assert_eq!(s.depth, 24);
        assert_eq!(s.next_seq, 27);
        assert_eq!(
            s.oldest.map(|e| (e.seq, e.ts, e.age_ms)),
            Some((3, 1_000, 2_000))
        );
        assert_eq!(s.newest.map(|e| e.seq), Some(26));
        assert_eq!(
            s.counters,
            Counters {
                reported: 26,
                acked: 2,
                dropped: 0,
                rejected: 0
            }
        );
        let p = page(&txn, 0, 10, PAGE_BYTES).unwrap();
        assert_eq!(p.changes.len(), 10);
        assert_eq!(p.changes[0].seq, 3);
        assert_eq!(p.changes[0].value, json!({"n": 2}));
        assert_eq!(p.next, Some(13));
        let p = page(&txn, 20, 10, PAGE_BYTES).unwrap();
        assert_eq!(p.changes.len(), 7);
        assert_eq!(p.next, None);
        assert_eq!(p.changes[6].origin.as_deref(), Some("cloud"));
        // The byte bound ends a page early, but never before its first change.
        let p = page(&txn, 0, 10, 1).unwrap();
        assert_eq!((p.changes.len(), p.next), (1, Some(4)));
        let mut seen = Vec::new();
        each(&txn, 25, 9, |e| {
            seen.push(e.seq);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, [25, 26]);
        drop(txn);

        let v = answer(&outbox, Some("peek"), Some(24), Some(5_000)).unwrap();
        assert_eq!(v["changes"].as_array().unwrap().len(), 3);
        assert_eq!(v["next"], Value::Null);
        let v = answer(&outbox, Some("peek"), None, None).unwrap();
        assert_eq!(v["changes"].as_array().unwrap().len(), DEFAULT_PEEK);
        assert_eq!(
            answer(&outbox, Some("drop"), None, None).unwrap_err().0,
            "bad-request"
        );
        assert_eq!(
            answer(&outbox, None, None, None).unwrap_err().0,
            "bad-request"
        );
        outbox.shutdown().await;
        drop(outbox);

        // Read-only, directly from the file once it is closed.
        let db = open_read_only(&opts.path, "test".into()).unwrap();
        let txn = db.begin_read().unwrap();
        assert_eq!(summary(&txn, 1 << 20, 3_000).unwrap(), s);
        let err = open_read_only(&dir.path().join("none.redb"), "test".into())
            .err()
            .unwrap();
        assert!(matches!(err, InspectError::NoStore { .. }), "{err}");
    }

    #[test]
    fn a_locked_store_is_reported_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let opts = StoreOptions {
            path: dir.path().join("s.redb"),
            max_bytes: 1 << 20,
            when_full: WhenFull::Reject,
            cache_size: 1 << 20,
        };
        let outbox = Outbox::open(&opts).unwrap();
        let err = open_read_only(&opts.path, "test".into()).err().unwrap();
        assert!(matches!(err, InspectError::Locked { .. }), "{err}");
        assert_eq!(err.exit_code(), 3);
        outbox.shutdown_blocking();
        let garbage = dir.path().join("g.redb");
        std::fs::write(&garbage, b"not a database at all").unwrap();
        let err = open_read_only(&garbage, "test".into()).err().unwrap();
        assert_eq!(err.exit_code(), 1, "{err}");
    }
}
