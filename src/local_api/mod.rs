//! The local socket (docs/PROTOCOL.md §6): a Unix stream socket where local programs report changes and
//! ask for status and state, one JSON object per line each way.
//!
//! Each connection is read by one task and answered by another, so a client may pipeline:
//! requests are handed to the outbox as they are read and answered strictly in request order
//! once each is durable. A request is all or nothing: one invalid change refuses the whole
//! request, and nothing of it is queued. Bad input gets an error line and the connection
//! stays usable; a line over [`MAX_LINE`] is skipped up to its newline and answered
//! `too-large`. A client that goes away loses nothing already answered (answers follow
//! commits); a request it sent but saw no answer to may or may not have been queued.
//!
//! Bounded against clients that misbehave: answers not yet written hold a share of a byte
//! budget and a connection whose share is full is not read (`ANSWER_SHARE`); idle and
//! stalled connections are closed after `local.idle_timeout`, a started line must be complete
//! within `LINE_TIMEOUT`, and at the client limit the longest-waiting connection makes room
//! for a new one ([`serve`]).

pub mod client;
pub mod inspect;
pub mod protocol;

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::health::status::{Identity, StatusBoard};
use crate::model::change::{ChangeError, RawChange};
use crate::model::glob::KeyGlob;
use crate::store::{Appended, Outbox, StoreError};

pub use protocol::MAX_LINE;
use protocol::{Ack, Doc, QueueQuery, Request, code, error_line, ok_with};
/// Most clients served at once; more wait in the listen backlog.
const MAX_CLIENTS: usize = 512;
/// Requests of one connection that may await their answers.
const PIPELINE_DEPTH: usize = 256;
/// Bytes of request lines that all connections together may have read and not yet answered
/// (their decoded changes wait in memory for the store). A reader waits for room before it
/// decodes a line, so a fast client cannot pile up more than this in the daemon's memory.
/// One line of [`MAX_LINE`] always fits.
const INFLIGHT_BYTES: usize = MAX_LINE;
/// Bytes of a request line a connection may hold uncounted, and the size of its read buffer.
const FREE_LINE: usize = 16 * 1024;
/// Bytes of request lines beyond [`FREE_LINE`] each that all connections together may hold
/// while reading them (a line is counted until the next one starts): 16 lines of
/// [`MAX_LINE`]. Without it, 512 clients each sending 1 MiB without a newline held 512 MiB.
const LINE_BYTES: usize = 16 * MAX_LINE;
/// Bytes of built answers not yet written to their sockets, all connections together. A
/// client that does not read its answers would otherwise make the daemon hold every answer
/// it pipelined (e.g. 300 `get` of a 1 MB document).
const ANSWER_BYTES: usize = 16 << 20;
/// Of [`ANSWER_BYTES`], what one connection may hold. An answer whose size is not known
/// before it is built (`get`, `status`, `history`, `queue`, `rollback`) reserves the whole
/// share first and keeps min(its length, share) until written, so a connection whose
/// unwritten answers fill its share is not read any further (backpressure), and at most
/// `ANSWER_BYTES / ANSWER_SHARE` answers larger than the share exist at once.
const ANSWER_SHARE: usize = 1 << 20;

fn appended_line(a: Appended) -> String {
    protocol::appended_line(a.first_seq, a.last_seq, a.filtered)
}

#[derive(Debug, Error)]
pub enum SocketError {
    #[error(
        "another edgesync is already serving {0} (stop it first, or set local.socket to another path)"
    )]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot create socket directory {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
    #[error("cannot bind socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
}

/// Binds the socket: creates its directory, replaces a stale socket file left by a crash,
/// refuses when a live agent answers on it, and sets mode 0660.
pub fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| SocketError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(SocketError::InUse(path.to_path_buf()));
            }
            tracing::info!(socket = %path.display(), "replacing stale socket");
            std::fs::remove_file(path).map_err(|source| SocketError::Bind {
                path: path.to_path_buf(),
                source,
            })?;
        }
        Ok(_) => return Err(SocketError::NotASocket(path.to_path_buf())),
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|source| SocketError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(|source| {
        SocketError::Bind {
            path: path.to_path_buf(),
            source,
        }
    })?;
    Ok(listener)
}

/// What every connection needs.
#[derive(Debug, Clone)]
pub struct Context {
    pub outbox: Outbox,
    pub board: StatusBoard,
    pub identity: Arc<Identity>,
    pub applier: crate::desired::apply::Applier,
    /// `local.idle_timeout`: a connection with no request and no answer pending for this
    /// long is closed (watching ones excepted), and so is one whose client has not taken an
    /// answer for this long.
    pub idle_timeout: Duration,
}

/// Serves connections until `stop` is cancelled, then stops reading requests, lets every
/// connection answer what it has read, and returns.
///
/// Admission is fair: with `MAX_CLIENTS` connections open, a new client is admitted by
/// closing the connection that has waited longest for its client (idle: no request and no
/// answer pending; or stalled: its client is not reading an answer), watching connections
/// last. Only while every connection is busy does a new client wait in the listen backlog.
pub async fn serve(listener: UnixListener, ctx: Context, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    let budget = Budget {
        lines: Arc::new(Semaphore::new(LINE_BYTES)),
        inflight: Arc::new(Semaphore::new(INFLIGHT_BYTES)),
        answers: Arc::new(Semaphore::new(ANSWER_BYTES)),
    };
    let registry = Registry::default();
    let mut conns = JoinSet::new();
    let mut next_id = 0u64;
    loop {
        tokio::select! {
            biased;
            // Shutdown: stop accepting.
            () = stop.cancelled() => break,
            // Reap finished connections so the set does not grow.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let Some(permit) = admit(&slots, &registry, &stop).await else { break };
                    next_id += 1;
                    let shared = Arc::new(Shared::new(next_id));
                    let ctx = ctx.clone();
                    let stop = stop.clone();
                    let budget = budget.clone();
                    let conn = Arc::clone(&shared);
                    let gone = registry.clone();
                    // Locked until the connection is registered, so that its `Leave` (which
                    // takes the lock) always comes after.
                    let mut open = registry.lock();
                    let abort = conns.spawn(async move {
                        // Also when the task is aborted (evicted).
                        let _slot = (permit, Leave(gone, conn.id));
                        if let Err(e) = connection(stream, ctx, stop, budget, conn).await {
                            tracing::debug!(error = %e, "local connection ended");
                        }
                    });
                    open.insert(shared.id, (shared, abort));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    while conns.join_next().await.is_some() {}
}

/// A slot for a new connection: a free one, or one freed by evicting the connection that has
/// waited longest for its client. `None` at shutdown.
async fn admit(
    slots: &Arc<Semaphore>,
    registry: &Registry,
    stop: &CancellationToken,
) -> Option<OwnedSemaphorePermit> {
    loop {
        if let Ok(p) = Arc::clone(slots).try_acquire_owned() {
            return Some(p);
        }
        let evicted = registry.evict_one();
        tokio::select! {
            biased;
            () = stop.cancelled() => return None,
            p = Arc::clone(slots).acquire_owned() => return p.ok(),
            // Nobody to evict now: look again soon (a busy connection may become idle).
            () = tokio::time::sleep(EVICT_RETRY), if !evicted => {}
        }
    }
}

/// How often a new client waiting for a slot looks for a connection to evict again.
const EVICT_RETRY: Duration = Duration::from_millis(100);
/// A request line must be complete within this long of its first byte.
const LINE_TIMEOUT: Duration = Duration::from_secs(10);
/// A write to the socket that takes longer than this marks the connection as stalled.
const STALL_MARK: Duration = Duration::from_millis(100);

/// The open connections by id, for eviction.
type Open = std::collections::HashMap<u64, (Arc<Shared>, AbortHandle)>;

/// The open connections, for eviction.
#[derive(Debug, Clone, Default)]
struct Registry(Arc<std::sync::Mutex<Open>>);

impl Registry {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, (Arc<Shared>, AbortHandle)>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Closes the connection that has waited longest for its client, watching ones last;
    /// false if every connection is busy.
    fn evict_one(&self) -> bool {
        let mut map = self.lock();
        let victim = map
            .values()
            .filter_map(|(s, _)| s.waiting_since().map(|t| ((s.is_watching(), t), s.id)))
            .min()
            .map(|(_, id)| id);
        match victim.and_then(|id| map.remove(&id)) {
            Some((_, abort)) => {
                tracing::debug!(
                    "local client limit reached: closing the longest-waiting connection"
                );
                abort.abort();
                true
            }
            None => false,
        }
    }
}

/// Removes a connection from the registry when its task ends.
struct Leave(Registry, u64);

impl Drop for Leave {
    fn drop(&mut self) {
        self.0.lock().remove(&self.1);
    }
}

/// What the accept loop sees of a connection.
#[derive(Debug)]
struct Shared {
    id: u64,
    state: std::sync::Mutex<ConnState>,
}

#[derive(Debug)]
struct ConnState {
    /// Since when the reader waits for the next request (None while it reads or handles one).
    reading_since: Option<Instant>,
    /// Answers handed to the writer and not written yet.
    unanswered: usize,
    /// When the writer last wrote an answer.
    last_written: Instant,
    /// Since when a write to the socket has not completed (the client does not read).
    stalled_since: Option<Instant>,
    watching: bool,
}

impl Shared {
    fn new(id: u64) -> Self {
        Self {
            id,
            state: std::sync::Mutex::new(ConnState {
                reading_since: None,
                unanswered: 0,
                last_written: Instant::now(),
                stalled_since: None,
                watching: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ConnState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Since when the connection waits for its client: idle (waiting for a request with
    /// nothing pending) or stalled (a write not taken by the client).
    fn waiting_since(&self) -> Option<Instant> {
        let s = self.lock();
        let idle = s
            .reading_since
            .filter(|_| s.unanswered == 0)
            .map(|t| t.max(s.last_written));
        match (idle, s.stalled_since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Since when it is idle, for the idle timeout (watching connections never are).
    fn idle_since(&self) -> Option<Instant> {
        let s = self.lock();
        if s.watching || s.unanswered > 0 {
            return None;
        }
        s.reading_since.map(|t| t.max(s.last_written))
    }

    fn is_watching(&self) -> bool {
        self.lock().watching
    }
}

/// Resolves once the connection has been idle for `limit`.
async fn idle_for(shared: &Shared, limit: Duration) {
    loop {
        let wake = match shared.idle_since() {
            Some(t) if t.elapsed() >= limit => return,
            Some(t) => t + limit,
            None => Instant::now() + limit,
        };
        tokio::time::sleep_until(wake.into()).await;
    }
}

/// Runs one write to the socket; marks the connection stalled while it does not complete,
/// and fails it when the client has not taken it within `limit`.
async fn write_step<F: std::future::Future<Output = io::Result<()>>>(
    shared: &Shared,
    limit: Duration,
    fut: F,
) -> io::Result<()> {
    tokio::pin!(fut);
    if let Ok(r) = tokio::time::timeout(STALL_MARK, &mut fut).await {
        return r;
    }
    let now = Instant::now();
    shared.lock().stalled_since = Some(now.checked_sub(STALL_MARK).unwrap_or(now));
    let r = tokio::time::timeout(limit, &mut fut).await;
    shared.lock().stalled_since = None;
    r.unwrap_or_else(|_| {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the client took no answer for {limit:?}"),
        ))
    })
}

/// The byte budgets all connections share.
#[derive(Debug, Clone)]
struct Budget {
    /// Request lines being read ([`LINE_BYTES`]).
    lines: Arc<Semaphore>,
    /// Request lines read and not yet answered by the store ([`INFLIGHT_BYTES`]).
    inflight: Arc<Semaphore>,
    /// Built answers not yet written ([`ANSWER_BYTES`]).
    answers: Arc<Semaphore>,
}

/// One connection's claim on [`Budget::answers`]: its own share and the global budget.
#[derive(Debug, Clone)]
struct AnswerBudget {
    mine: Arc<Semaphore>,
    all: Arc<Semaphore>,
}

/// An answer's hold on the answer budgets; dropped once the answer is written.
#[derive(Debug)]
struct Held {
    mine: OwnedSemaphorePermit,
    all: OwnedSemaphorePermit,
}

impl AnswerBudget {
    fn new(all: Arc<Semaphore>) -> Self {
        Self {
            mine: Arc::new(Semaphore::new(ANSWER_SHARE)),
            all,
        }
    }

    /// Waits until this connection's earlier answers left room for a whole share, then for
    /// the global budget. `None` once the budget is closed (never, in practice).
    async fn reserve(&self) -> Option<Held> {
        let want = u32::try_from(ANSWER_SHARE).unwrap_or(u32::MAX);
        let mine = Arc::clone(&self.mine).acquire_many_owned(want).await.ok()?;
        let all = Arc::clone(&self.all).acquire_many_owned(want).await.ok()?;
        Some(Held { mine, all })
    }

    /// A hold of min(`len`, share) if there is room now (for watch events, which must not
    /// wait).
    fn try_hold(&self, len: usize) -> Option<Held> {
        let want = u32::try_from(len.min(ANSWER_SHARE)).unwrap_or(u32::MAX);
        let mine = Arc::clone(&self.mine).try_acquire_many_owned(want).ok()?;
        let all = Arc::clone(&self.all).try_acquire_many_owned(want).ok()?;
        Some(Held { mine, all })
    }
}

impl Held {
    /// Gives back what an answer of `len` bytes does not need: it keeps min(len, share).
    fn shrink_to(mut self, len: usize) -> Self {
        let keep = len.min(self.mine.num_permits());
        let extra = self.mine.num_permits() - keep;
        drop(self.mine.split(extra));
        drop(self.all.split(extra));
        self
    }
}

/// An answer, ready or waiting for the store.
enum Pending {
    Ready(String),
    /// A ready answer holding its bytes in the answer budget until written.
    Held(String, Held),
    /// A watch event (not an answer to a request), likewise.
    Event(String, Held),
    Store(StoreReply),
    /// An answer computed by a task (e.g. a rollback running a handler).
    Later(oneshot::Receiver<(String, Held)>),
}

async fn connection(
    stream: UnixStream,
    ctx: Context,
    stop: CancellationToken,
    budget: Budget,
    shared: Arc<Shared>,
) -> io::Result<()> {
    let (rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::channel::<Pending>(PIPELINE_DEPTH);
    let idle = ctx.idle_timeout;
    // Reader and writer run in this one task, so that evicting it (abort) ends both.
    let writer = answer(rx, wr, &shared, idle);
    tokio::pin!(writer);
    let reader = read_requests(rd, ctx, stop, budget, &shared, tx);
    tokio::select! {
        // The writer failed (the client went away or took no answer for too long).
        r = &mut writer => return r,
        r = reader => r?,
    }
    // The reader is done: the writer writes what was read and ends.
    writer.await
}

/// Reads requests and hands their answers, in order, to the writer through `tx`.
async fn read_requests(
    rd: tokio::net::unix::OwnedReadHalf,
    ctx: Context,
    stop: CancellationToken,
    budget: Budget,
    shared: &Shared,
    tx: mpsc::Sender<Pending>,
) -> io::Result<()> {
    let answers = AnswerBudget::new(budget.answers);
    let mut watching = Watching(None, ctx.applier.clone());
    let mut reader = BufReader::with_capacity(FREE_LINE, rd);
    let mut line = Vec::with_capacity(1024);
    let mut line_held = None;
    loop {
        // Wait for the next request to start: idle from here.
        shared.lock().reading_since = Some(Instant::now());
        let started = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            r = reader.fill_buf() => !r?.is_empty(),
            () = idle_for(shared, ctx.idle_timeout) => {
                tracing::debug!("closing an idle local connection");
                break;
            }
        };
        shared.lock().reading_since = None;
        if !started {
            break; // EOF
        }
        let read = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            r = tokio::time::timeout(LINE_TIMEOUT, read_line_counted(
                &mut reader,
                &mut line,
                Some(LineBudget { all: &budget.lines, held: &mut line_held }),
            )) => match r {
                Ok(r) => r?,
                Err(_) => {
                    let message = format!("request line not completed within {LINE_TIMEOUT:?}");
                    shared.lock().unanswered += 1;
                    let _ = tx.send(Pending::Ready(error_line(code::BAD_REQUEST, message))).await;
                    break;
                }
            },
        };
        let pending = match read {
            Line::Eof => break,
            Line::TooLong => Pending::Ready(error_line(
                code::TOO_LARGE,
                format!("request line longer than {MAX_LINE} bytes"),
            )),
            Line::Ok if line.iter().all(u8::is_ascii_whitespace) => continue,
            Line::Ok => {
                let want = u32::try_from(line.len().min(INFLIGHT_BYTES)).unwrap_or(u32::MAX);
                let Ok(permit) = Arc::clone(&budget.inflight).acquire_many_owned(want).await else {
                    break;
                };
                let p = handle(&line, &ctx, &tx, &mut watching.0, permit, &answers).await;
                if watching.0.is_some() {
                    shared.lock().watching = true;
                }
                p
            }
        };
        // Counted before it is sent, so the writer never counts below zero.
        shared.lock().unanswered += 1;
        if tx.send(pending).await.is_err() {
            break; // the writer ended
        }
        // A request line that grew the buffer (up to MAX_LINE) does not keep it.
        if line.capacity() > 64 * 1024 {
            line = Vec::with_capacity(1024);
        }
    }
    Ok(())
}

/// The connection's watch registration, forgotten when the connection ends (also when its
/// task is aborted).
struct Watching(Option<u64>, crate::desired::apply::Applier);

impl Drop for Watching {
    fn drop(&mut self) {
        if let Some(conn) = self.0 {
            self.1.watchers().forget(conn);
        }
    }
}

type StoreReply = oneshot::Receiver<Result<Appended, StoreError>>;

/// Holds a request's share of [`INFLIGHT_BYTES`] until the store has answered it (its changes
/// are then committed and freed), whether or not the client reads the answer yet.
fn release_when_answered(rx: StoreReply, permit: OwnedSemaphorePermit) -> StoreReply {
    let (tx, out) = oneshot::channel();
    tokio::spawn(async move {
        let result = rx.await;
        drop(permit);
        // A store that went away drops `tx` too, which the answer reports as closed.
        if let Ok(r) = result {
            let _ = tx.send(r);
        }
    });
    out
}

/// Writes answers in request order. Answers are buffered only while the next one is ready
/// at once: before waiting (for the next request or for the store to commit the next
/// answer) everything written is flushed, so no answer waits in the buffer for a later one.
///
/// A write the client does not take within `limit` fails the connection.
async fn answer(
    mut rx: mpsc::Receiver<Pending>,
    wr: tokio::net::unix::OwnedWriteHalf,
    shared: &Shared,
    limit: Duration,
) -> io::Result<()> {
    let mut out = BufWriter::with_capacity(64 * 1024, wr);
    loop {
        let p = match rx.try_recv() {
            Ok(p) => p,
            Err(_) => {
                write_step(shared, limit, out.flush()).await?;
                match rx.recv().await {
                    Some(p) => p,
                    None => return Ok(()),
                }
            }
        };
        let mut held = None;
        let answers_request = !matches!(p, Pending::Event(..));
        let line = match p {
            Pending::Event(s, h) => {
                held = Some(h);
                s
            }
            Pending::Ready(s) => s,
            Pending::Held(s, h) => {
                held = Some(h);
                s
            }
            Pending::Later(r) => {
                write_step(shared, limit, out.flush()).await?;
                match r.await {
                    Ok((s, h)) => {
                        held = Some(h);
                        s
                    }
                    Err(_) => error_line(code::IO_ERROR, "the request was abandoned"),
                }
            }
            Pending::Store(mut r) => {
                let result = match r.try_recv() {
                    Ok(result) => Some(result),
                    Err(oneshot::error::TryRecvError::Empty) => {
                        write_step(shared, limit, out.flush()).await?;
                        r.await.ok()
                    }
                    Err(oneshot::error::TryRecvError::Closed) => None,
                };
                match result {
                    Some(Ok(a)) => appended_line(a),
                    Some(Err(e)) => error_line(e.code(), e.to_string()),
                    None => error_line(code::IO_ERROR, StoreError::Closed.to_string()),
                }
            }
        };
        write_step(shared, limit, out.write_all(line.as_bytes())).await?;
        write_step(shared, limit, out.write_all(b"\n")).await?;
        // Written (to the socket, or to the buffer flushed before the next wait).
        drop(line);
        drop(held);
        let mut s = shared.lock();
        if answers_request {
            s.unanswered = s.unanswered.saturating_sub(1);
        }
        s.last_written = Instant::now();
    }
}

/// What [`read_line`] found. Public for the fuzz targets only.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Line {
    Ok,
    TooLong,
    Eof,
}

/// Reads one line into `buf` (without the newline), never holding more than [`MAX_LINE`].
#[doc(hidden)]
pub async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> io::Result<Line> {
    read_line_counted(r, buf, None).await
}

/// Where a connection counts the bytes of its request line beyond [`FREE_LINE`].
struct LineBudget<'a> {
    all: &'a Arc<Semaphore>,
    /// What the line being read holds; given back when the next line starts.
    held: &'a mut Option<OwnedSemaphorePermit>,
}

/// [`read_line`], counting the line's bytes beyond [`FREE_LINE`] against `budget` before it
/// takes them from the socket: when the budget is used up, the line waits (its bytes stay in
/// the client's socket), so partial lines of many connections cannot fill the memory.
async fn read_line_counted<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    mut budget: Option<LineBudget<'_>>,
) -> io::Result<Line> {
    buf.clear();
    if let Some(b) = budget.as_mut() {
        *b.held = None;
    }
    let mut too_long = false;
    loop {
        let (take, done) = {
            let chunk = r.fill_buf().await?;
            if chunk.is_empty() {
                // EOF: a last line without newline still counts.
                return Ok(match (too_long, buf.is_empty()) {
                    (true, _) => Line::TooLong,
                    (false, true) => Line::Eof,
                    (false, false) => Line::Ok,
                });
            }
            match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => (i, true),
                None => (chunk.len(), false),
            }
        };
        if !too_long {
            if buf.len() + take > MAX_LINE {
                too_long = true;
                buf.clear();
                if let Some(b) = budget.as_mut() {
                    *b.held = None;
                }
            } else {
                if let Some(b) = budget.as_mut() {
                    let need = (buf.len() + take).saturating_sub(FREE_LINE);
                    let have = b.held.as_ref().map_or(0, OwnedSemaphorePermit::num_permits);
                    if need > have {
                        let more = u32::try_from(need - have).unwrap_or(u32::MAX);
                        let more = Arc::clone(b.all)
                            .acquire_many_owned(more)
                            .await
                            .map_err(|_| io::Error::other("the line budget is closed"))?;
                        match b.held.as_mut() {
                            Some(p) => p.merge(more),
                            None => *b.held = Some(more),
                        }
                    }
                }
                // The same bytes: nothing was consumed while waiting.
                let chunk = r.fill_buf().await?;
                let Some(bytes) = chunk.get(..take) else {
                    return Err(io::Error::other("the read buffer changed while waiting"));
                };
                buf.extend_from_slice(bytes);
            }
        }
        r.consume(if done { take + 1 } else { take });
        if done {
            return Ok(if too_long { Line::TooLong } else { Line::Ok });
        }
    }
}

/// Decodes and executes one request. `permit` holds the line's bytes of
/// [`INFLIGHT_BYTES`]: a report keeps it until the store answers; every other request gives
/// it back before it waits for room in the answer budget, so a client that does not read
/// cannot hold up the reports of others.
async fn handle(
    line: &[u8],
    ctx: &Context,
    tx: &mpsc::Sender<Pending>,
    watching: &mut Option<u64>,
    permit: OwnedSemaphorePermit,
    answers: &AnswerBudget,
) -> Pending {
    let req = match decode_line(line) {
        Ok(r) => r,
        Err(answer) => return Pending::Ready(answer),
    };
    let sized = match req {
        // Answers of these are small and of bounded size (PIPELINE_DEPTH of them at most).
        Request::Report { changes } => {
            return match report(changes, ctx).await {
                Pending::Store(rx) => Pending::Store(release_when_answered(rx, permit)),
                other => other,
            };
        }
        Request::Watch { keys } => {
            return Pending::Ready(watch_keys(keys, ctx, tx, answers, watching));
        }
        Request::Ack(a) => return Pending::Ready(ack(a, ctx)),
        Request::Reconnect => return Pending::Ready(reconnect(ctx)),
        // Answers of unknown size.
        Request::Status => Sized::Status,
        Request::Get { doc, key } => Sized::Get(doc, key),
        Request::History { key, limit } => Sized::History(key, limit),
        Request::Queue(query) => Sized::Queue(query),
        Request::Rollback { key, version } => Sized::Rollback(key, version),
    };
    // Built only once a share of the answer budget is reserved (one place for every such
    // request: each await point is code in the connection's future).
    drop(permit);
    let Some(held) = answers.reserve().await else {
        return Pending::Ready(error_line(code::IO_ERROR, "the daemon is stopping"));
    };
    let line = match sized {
        Sized::Status => status(ctx).await,
        Sized::Get(doc, key) => get(doc, key.as_deref(), ctx),
        Sized::History(key, limit) => history(&key, limit, ctx),
        Sized::Queue(query) => queue(query, ctx).await,
        Sized::Rollback(key, version) => return rollback(key, version, ctx, held),
    };
    let held = held.shrink_to(line.len() + 1);
    Pending::Held(line, held)
}

/// The requests whose answers are of unknown size.
enum Sized {
    Status,
    Get(Doc, Option<String>),
    History(String, Option<usize>),
    Queue(QueueQuery),
    Rollback(String, u64),
}

/// Decodes one request line; `Err` is the error line to answer. Public for the fuzz targets.
#[doc(hidden)]
pub fn decode_line(line: &[u8]) -> Result<Request, String> {
    Request::parse(line).map_err(|e| error_line(e.code(), e.to_string()))
}

/// The status document, with the desired version and the health figures (`metrics`).
async fn status(ctx: &Context) -> String {
    let ctx = ctx.clone();
    let status = tokio::task::spawn_blocking(move || {
        crate::health::status::collect(&ctx.identity, &ctx.outbox, &ctx.board)
    })
    .await;
    match status {
        Ok(s) => ok_with(serde_json::to_value(s).unwrap_or_default()),
        Err(e) => error_line(code::IO_ERROR, e.to_string()),
    }
}

async fn report(raw: Vec<RawChange>, ctx: &Context) -> Pending {
    let n = raw.len() as u64;
    let mut changes = Vec::with_capacity(raw.len());
    let (now, max_future) = (crate::model::change::now_ms(), ctx.applier.max_future_ts());
    for (i, c) in raw.into_iter().enumerate() {
        match c.validate_at(now, max_future) {
            Ok(c) => changes.push(c),
            Err(e) => {
                // Counted in the metrics (rejected, reason invalid-change).
                ctx.board.count_invalid(n);
                return Pending::Ready(invalid_change(i, &e));
            }
        }
    }
    match ctx.outbox.submit(changes).await {
        Ok(rx) => Pending::Store(rx),
        Err(e) => Pending::Ready(error_line(e.code(), e.to_string())),
    }
}

fn invalid_change(index: usize, e: &ChangeError) -> String {
    error_line(
        code::INVALID_CHANGE,
        format!("change {index}: {e}; nothing of this request was queued"),
    )
}

fn get(doc: Doc, key: Option<&str>, ctx: &Context) -> String {
    match doc {
        Doc::Reported => match ctx.outbox.reported(key) {
            Ok(map) => {
                let mut state = serde_json::Map::new();
                let mut entries = serde_json::Map::new();
                for (k, v) in map {
                    entries.insert(k.clone(), serde_json::json!({"seq": v.seq, "ts": v.ts}));
                    state.insert(k, v.value);
                }
                ok_with(serde_json::json!({"doc": "reported", "state": state, "entries": entries}))
            }
            Err(e) => error_line(e.code(), e.to_string()),
        },
        Doc::Desired => {
            let state = crate::store::desired::state(&ctx.outbox, key);
            let version = crate::store::desired::applied_version(&ctx.outbox);
            match (state, version) {
                (Ok(map), Ok(version)) => {
                    let mut state = serde_json::Map::new();
                    let mut entries = serde_json::Map::new();
                    for (k, v) in map {
                        entries.insert(
                            k.clone(),
                            serde_json::json!({"version": v.version, "ts": v.ts}),
                        );
                        state.insert(k, v.value);
                    }
                    ok_with(
                        serde_json::json!({"doc": "desired", "version": version, "state": state, "entries": entries}),
                    )
                }
                (Err(e), _) | (_, Err(e)) => error_line(e.code(), e.to_string()),
            }
        }
    }
}

/// `{"op":"watch","keys":["led.*"]}`: this connection receives desired changes of those
/// keys (for `watch` handlers) until it closes.
fn watch_keys(
    globs: Vec<KeyGlob>,
    ctx: &Context,
    tx: &mpsc::Sender<Pending>,
    answers: &AnswerBudget,
    watching: &mut Option<u64>,
) -> String {
    let answer = ok_with(serde_json::json!({ "watching": globs }));
    let tx = tx.clone();
    let answers = answers.clone();
    // An event that finds no room fails its delivery ("not reading its socket").
    let sink: crate::desired::watch::Sink = Box::new(move |line| {
        answers
            .try_hold(line.len() + 1)
            .is_some_and(|held| tx.try_send(Pending::Event(line, held)).is_ok())
    });
    *watching = Some(ctx.applier.watchers().watch(*watching, globs, sink));
    answer
}

/// `{"op":"ack","id":N,"ok":true}` or `"ok":false,"error":"..."`: answers a watch event.
/// `reconnect` (docs/PROTOCOL.md §6.8): the state found, and whether a backoff wait was
/// cut short (only when offline; a connection or a try under way is left alone).
fn reconnect(ctx: &Context) -> String {
    let state = ctx.board.retry_now();
    ok_with(serde_json::json!({
        "state": state,
        "retrying": state == crate::health::status::LinkState::Offline,
    }))
}

fn ack(a: Ack, ctx: &Context) -> String {
    let id = a.id;
    if ctx.applier.watchers().ack(id, a.result()) {
        ok_with(serde_json::json!({}))
    } else {
        error_line(
            code::BAD_REQUEST,
            format!("no event {id} is waiting for an ack (late, or answered already)"),
        )
    }
}

/// `{"op":"history","key":K,"limit":N}`: the key's recent desired values, newest first.
fn history(key: &str, limit: Option<usize>, ctx: &Context) -> String {
    match crate::store::desired::history(&ctx.outbox, key) {
        Ok(mut h) => {
            h.reverse();
            h.truncate(limit.unwrap_or(usize::MAX));
            ok_with(serde_json::json!({"key": key, "history": h}))
        }
        Err(e) => error_line(e.code(), e.to_string()),
    }
}

/// `{"op":"queue","what":"stats"}` or `{"op":"queue","what":"peek","from":S,"limit":N}`:
/// reads the queue (see [`crate::local_api::inspect::answer_query`]), off the async threads.
async fn queue(query: QueueQuery, ctx: &Context) -> String {
    let outbox = ctx.outbox.clone();
    let answer = tokio::task::spawn_blocking(move || {
        crate::local_api::inspect::answer_query(&outbox, query)
    })
    .await;
    match answer {
        Ok(Ok(v)) => ok_with(v),
        Ok(Err(e)) => error_line(code::IO_ERROR, e.to_string()),
        Err(e) => error_line(code::IO_ERROR, e.to_string()),
    }
}

/// `{"op":"rollback","key":K,"version":V}`: applies the key's value of version V again.
fn rollback(key: String, version: u64, ctx: &Context, held: Held) -> Pending {
    let applier = ctx.applier.clone();
    let (done, rx) = oneshot::channel();
    tokio::spawn(async move {
        let line = match applier.rollback(&key, version).await {
            Ok(v) => ok_with(v),
            Err(e) => error_line(code::FAILED, e.to_string()),
        };
        let held = held.shrink_to(line.len() + 1);
        let _ = done.send((line, held));
    });
    Pending::Later(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(input: &[u8]) -> Vec<Result<Vec<u8>, &'static str>> {
        let mut r = BufReader::with_capacity(7, input);
        let mut buf = Vec::new();
        let mut out = Vec::new();
        loop {
            match read_line(&mut r, &mut buf).await.unwrap() {
                Line::Eof => return out,
                Line::TooLong => out.push(Err("too long")),
                Line::Ok => out.push(Ok(buf.clone())),
            }
        }
    }

    #[tokio::test]
    async fn lines_are_split_and_overlong_ones_skipped() {
        let mut input = b"a\nbb\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', MAX_LINE + 10));
        input.extend(b"\nc");
        let got = lines(&input).await;
        assert_eq!(
            got,
            vec![
                Ok(b"a".to_vec()),
                Ok(b"bb".to_vec()),
                Err("too long"),
                Ok(b"c".to_vec())
            ]
        );
    }

    #[tokio::test]
    async fn an_answer_is_not_held_back_by_a_later_one_still_waiting() {
        let (client, server) = UnixStream::pair().unwrap();
        let (_, wr) = server.into_split();
        let (tx, rx) = mpsc::channel(8);
        // The store has not answered the second request (and will not during the test).
        let (_store, waiting) = oneshot::channel();
        tx.send(Pending::Ready("first".into())).await.unwrap();
        tx.send(Pending::Store(waiting)).await.unwrap();
        let shared = Shared::new(1);
        let writer = tokio::spawn(async move {
            answer(rx, wr, &shared, std::time::Duration::from_secs(60)).await
        });
        let mut line = String::new();
        let mut client = BufReader::new(client);
        let read = client.read_line(&mut line);
        tokio::time::timeout(std::time::Duration::from_secs(10), read)
            .await
            .expect("the first answer must be flushed while the second waits")
            .unwrap();
        assert_eq!(line, "first\n");
        writer.abort();
    }

    #[tokio::test]
    async fn budget_returns_when_the_store_answers_even_if_unread() {
        let budget = Arc::new(Semaphore::new(10));
        let permit = Arc::clone(&budget).acquire_many_owned(10).await.unwrap();
        let (store, reply) = oneshot::channel();
        let answer = release_when_answered(reply, permit);
        assert_eq!(budget.available_permits(), 0);
        let appended = Appended {
            first_seq: 1,
            last_seq: 3,
            filtered: 0,
        };
        store.send(Ok(appended)).unwrap();
        let all = budget.acquire_many(10);
        let _all = tokio::time::timeout(std::time::Duration::from_secs(10), all)
            .await
            .expect("the budget must come back once the store answered")
            .unwrap();
        assert_eq!(answer.await.unwrap().unwrap(), appended);

        // A store that closes without answering: the budget comes back, the answer is an error.
        let permit = Arc::clone(&budget).acquire_many_owned(0).await.unwrap();
        let (store, reply) = oneshot::channel::<Result<Appended, StoreError>>();
        drop(store);
        assert!(release_when_answered(reply, permit).await.is_err());
    }

    #[tokio::test]
    async fn an_answer_keeps_min_of_its_length_and_the_share_until_written() {
        let all = Arc::new(Semaphore::new(ANSWER_BYTES));
        let budget = AnswerBudget::new(Arc::clone(&all));
        let small = budget.reserve().await.unwrap().shrink_to(100);
        assert_eq!(budget.mine.available_permits(), ANSWER_SHARE - 100);
        assert_eq!(all.available_permits(), ANSWER_BYTES - 100);
        // Larger than the share: deliverable, holding the whole share.
        drop(small);
        let big = budget.reserve().await.unwrap().shrink_to(3 * ANSWER_SHARE);
        assert_eq!(budget.mine.available_permits(), 0);
        assert_eq!(all.available_permits(), ANSWER_BYTES - ANSWER_SHARE);
        // The connection is full: the next answer waits (its reader stops), events are refused.
        let next = budget.reserve();
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), next)
                .await
                .is_err()
        );
        assert!(budget.try_hold(10).is_none());
        drop(big);
        assert_eq!(all.available_permits(), ANSWER_BYTES);
        assert!(budget.try_hold(10).is_some());
    }

    #[test]
    fn error_lines_are_json_with_code() {
        let v: serde_json::Value =
            serde_json::from_str(&error_line("bad-request", "x\"y")).unwrap();
        assert_eq!(v["ok"], false);
        assert_eq!(v["error"]["code"], "bad-request");
        assert_eq!(v["error"]["message"], "x\"y");
        let v: serde_json::Value = serde_json::from_str(&appended_line(Appended {
            first_seq: 4,
            last_seq: 6,
            filtered: 0,
        }))
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"ok": true, "first_seq": 4, "last_seq": 6})
        );
        // Filtered changes are said only when there are some (compatible answers).
        let v: serde_json::Value = serde_json::from_str(&appended_line(Appended {
            first_seq: 7,
            last_seq: 6,
            filtered: 2,
        }))
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"ok": true, "first_seq": 7, "last_seq": 6, "filtered": 2})
        );
    }
}
