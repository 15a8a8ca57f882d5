//! The outbox: every reported change, queued durably in a redb file until the broker has
//! acknowledged it.
//!
//! # Layout
//! One redb file (`store.path`) with three tables:
//! - `outbox`: `seq (u64) → record` (CBOR `[ts, key, value]`, see [`record`]), the queue;
//! - `reported`: `key → (seq, record)`, the latest reported value of every key;
//! - `meta`: `name → u64`: `next_seq`, queue `depth` and `bytes`, the persistent counters
//!   (`reported`, `acked`, `dropped`, `rejected`, `corrupt`), `seq_reserved` (see "Sent while the
//!   fsync runs") and `state_bytes` (see "Bounds").
//!
//! # Invariants
//! - **Durable before acknowledged.** A caller of [`Outbox::append`] is answered only after the
//!   write transaction holding its changes is durable: committed with
//!   `Durability::Immediate` (fsync), or, for a small commit, recorded in the journal (one
//!   fsync'ed block) and committed without durability. A crash after the answer loses
//!   nothing; a crash before it may lose the request, which the caller then never saw
//!   acknowledged.
//! - **Journal** ([`journal`], flash wear). Small commits of appends and acks are journal
//!   records plus non-durable redb commits; a checkpoint (a durable commit: caller
//!   transactions, [`JOURNAL_MAX_CHANGES`] changes or more, a record past
//!   [`journal::RECORD_MAX`] or a change of more than [`JOURNAL_VALUE_MAX`], the journal
//!   full, or half full at a commit of acknowledgements alone, [`JOURNAL_RECORDS_MAX`]
//!   records or [`JOURNAL_CHANGES_MAX`] changes in them, a clean stop; never by time, so an idle store writes nothing)
//!   persists them all and bumps `meta.wal_epoch`. Open replays the records of the current
//!   epoch past `meta.wal_records` (those redb already holds) in one checkpoint, with the
//!   seqs they were given and without refusing what was acknowledged. Acks alone write
//!   nothing until [`ACK_SYNC`] changes or the next record: a crash sends those again.
//! - **Group commit.** One writer thread owns all writes. It takes every request waiting in
//!   its channel (up to [`MAX_TXN_CHANGES`] changes) into one transaction and one fsync, so load
//!   makes batches by itself and an idle store adds no delay to a lone request.
//! - **Order and seq.** `seq` is assigned inside the transaction from `meta.next_seq`, strictly
//!   increasing in the order requests reached the writer, and never reused: `next_seq` is
//!   persisted in the same transaction, also when the queue is empty, and on open it is raised
//!   past the last queued seq should the metadata ever lag. A new store starts at 1, except
//!   where an earlier store may have handed out seqs (the file exists with 0 bytes, or a
//!   file was set aside next to it as `PATH.*`): then it starts at a floor from the clock,
//!   Unix ms × 1000 ([`clock_seq_floor`]), logged, so receivers deduplicating by
//!   `(device, seq)` never take new changes for old ones.
//! - **Sent while the fsync runs.** While the sync engine listens ([`Outbox::tail`]), the
//!   writer hands it each commit's new records just before the commit, so an online change
//!   travels to the broker while the disk syncs (report → cloud latency without the fsync).
//!   The caller's answer still waits for the commit. Such a change is in doubt until then,
//!   like one whose answer a crash cut off: if the commit fails or power is cut, it may have
//!   reached the broker without being queued. Its seq must still never be reused, so seqs
//!   handed out this way come from a durable reservation: every commit while the engine
//!   listens persists `seq_reserved` = `next_seq` + [`SEQ_RESERVE`], only seqs below the
//!   reservation already on disk are handed over early, and an open after a crash (or a
//!   failed commit) continues at the reservation. A crash can therefore leave a gap in the
//!   seqs (at most [`SEQ_RESERVE`] + one commit); a clean shutdown releases the reservation.
//! - **All or nothing.** The changes of one request get consecutive seqs and are committed
//!   together or not at all.
//! - **Bounds.** `store.max_bytes` bounds everything the store holds, in two figures that
//!   together stay within it: `bytes`, the queue (every queued record as its encoded length
//!   plus [`RECORD_OVERHEAD`], its seq key and B-tree entry), and `state_bytes`, the state
//!   (each row of the `reported` latest values and of the desired state, its history and
//!   its documents waiting to be applied, as key + value + [`RECORD_OVERHEAD`], see
//!   [`row_cost`]). The state may take at most half of `max_bytes` ([`state_allowance`]); the
//!   queue takes what the state leaves, so at least the other half.
//!   - A report whose latest values would grow `state_bytes` past the allowance (new keys,
//!     larger values) is refused whole with `store-full` ([`StoreError::StateFull`], saying
//!     so), counted in `rejected`, whatever `when_full` says: latest values are state, never
//!     dropped. A report that does not grow the state (an existing key, a value no larger)
//!     is never refused for it.
//!   - An append that would push `bytes + state_bytes` past `max_bytes` either evicts the
//!     oldest changes first (`drop-oldest`, counted in `dropped`) or is refused whole with
//!     `store-full` (`reject`, counted in `rejected`). Desired state growing under a full
//!     queue evicts the same way ([`TxnCtx::charge_state`]).
//!   - The desired module reserves a document's worst-case growth when it takes the
//!     document in and refuses (`rejected`, per key) the keys that do not fit
//!     (`crate::store::desired`); its history is trimmed, oldest first, to stay in bound.
//!
//!   The file itself is larger than the accounted bytes by redb's page slack: B-tree pages
//!   are at most half-empty after splits, the file grows in steps, and a few pages of
//!   metadata and tables the accounting leaves out (recent desired results, pending results
//!   and command records, each bounded by count) come on top, so the file stays below
//!   `2 × max_bytes + 1 MiB` (measured: 400 keys × 60 KB against 1 MiB, 40 desired keys ×
//!   60 KB against 4 MiB, `tests/harden_store.rs`). redb reuses freed pages; the file does
//!   not shrink after a drain.
//! - **Ack.** Changes leave the outbox only through [`Outbox::ack`] (the sync engine calls it
//!   after the broker's PUBACK) or by `drop-oldest` eviction. Acks are batched into the same
//!   group-commit transactions as appends. Acking a seq that is no longer queued is a no-op.
//! - **Counters** change in the same transaction as the data they count, so they are always
//!   consistent with the queue.
//! - **Open** reads only `meta` and the first/last keys: no scan, whatever the backlog.
//!   A file that is not a redb database, or that redb cannot repair, is reported with its
//!   path and is never replaced or truncated. One exception: a file whose creation never
//!   completed (a power cut before redb wrote its magic number, which it does last) never
//!   held a commit; it is renamed to `PATH.incomplete` and a new store is created. A new
//!   store file is created 0600 (owner only), whatever the umask.
//! - **Damaged records and pages.** Each record's value is checked before the sync engine
//!   splices it into a batch ([`record::value_end`]); a damaged one is skipped, logged with
//!   its seq, removed with its batch's ack and counted in `corrupt` (never in `acked`).
//!   redb panics on some damaged pages; reads and the writer catch that as
//!   [`StoreError::Damaged`] in builds that unwind. The shipped build (`panic = "abort"`)
//!   aborts instead, with one line naming the store ([`crate::sys::fatal`]); at the restart,
//!   redb's repair of the uncleanly closed file walks every page and stops at the damage
//!   again (a clear refusal where it unwinds; another abort with the line saying to move
//!   the file aside where it does not), so systemd's start limit ends the loop.
//! - **I/O errors.** A commit that fails answers every request of its group with the error
//!   (`store-full` for ENOSPC/EDQUOT, else `io-error`) and nothing of it is acknowledged.
//!   redb refuses all work after an I/O error until reopened, so the writer then reopens the
//!   store (backoff 50 ms doubling to 2 s; requests meanwhile get the last error at once)
//!   and reloads `meta` from what is on disk: the store recovers by itself when space
//!   returns or the fault clears.

pub mod record;

pub mod class;
pub mod desired;
pub mod journal;
pub mod shadow;
pub mod tables;

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::{Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, StorageBackend};
use serde::Serialize;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};

pub use crate::config::WhenFull;
use crate::model::change::{NewChange, now_ms};

use class::{Allow, ClassCounters, ClassId, ClassStats, Classes, EvictQueue, Intake, Last};
use tables::{CLASS_QUEUE, META, OUTBOX, REPORTED, SUPERSEDED, class_key, class_key_seq};

/// Commits handed over before the fsync that may wait for the sync engine (each at most
/// the hand-over threshold of records); beyond it the engine reads from the store.
pub const TAIL_DEPTH: usize = 64;

/// Accounted size of a queued record beyond its encoded bytes (seq key + B-tree entry).
pub const RECORD_OVERHEAD: u64 = 24;

/// The share of `store.max_bytes` the state (latest values, desired state and history) may
/// take: half. The queue always keeps the rest.
pub fn state_allowance(max_bytes: u64) -> u64 {
    max_bytes / 2
}

/// Accounted size of a row of a state table: its key, its value, and the B-tree entry.
pub fn row_cost(key_len: usize, value_len: usize) -> u64 {
    key_len as u64 + value_len as u64 + RECORD_OVERHEAD
}

/// Accounted size of a `reported` row: key, `(seq, record)`.
fn reported_row_cost(key: &str, record_len: usize) -> u64 {
    row_cost(key.len(), record_len + 8)
}
/// Most changes the writer puts into one transaction.
pub const MAX_TXN_CHANGES: usize = 16_384;
/// Seqs reserved ahead of `next_seq` while the sync engine takes records before their fsync.
pub const SEQ_RESERVE: u64 = 16_384;
/// Most records of one commit handed to the sync engine before the fsync; a larger commit is
/// a backlog, which the engine reads from the store anyway.
const TAIL_MAX: usize = 1024;
/// Requests that may wait for the writer before submitters are made to wait.
const CHANNEL_DEPTH: usize = 4096;
/// First and longest wait before the writer reopens the store after an I/O error.
/// A commit of at least this many changes is a checkpoint (a durable redb commit): its
/// fixed cost is spread over them, and it would make a large journal record.
pub const JOURNAL_MAX_CHANGES: usize = 2048;
/// Acknowledged changes whose journal record may stay unsynced; more are synced at once.
/// Bounds what a crash can send again (module docs, "Journal").
pub const ACK_SYNC: u64 = 1024;
/// A change with a larger value makes its commit a checkpoint: it costs blocks either way,
/// and non-durable commits of large values grow the store file (redb reuses the pages they
/// free only after the next durable commit).
pub const JOURNAL_VALUE_MAX: usize = 4096;
/// A checkpoint after this many journal records.
pub const JOURNAL_RECORDS_MAX: u64 = 4096;
/// A checkpoint once the journal's records queued this many changes: redb keeps the pages
/// of non-durable commits in memory until then (peak RSS while taking a backlog).
pub const JOURNAL_CHANGES_MAX: u64 = 8192;
const REOPEN_MIN: Duration = Duration::from_millis(50);
const REOPEN_MAX: Duration = Duration::from_secs(2);

/// How to open the store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub path: PathBuf,
    pub max_bytes: u64,
    pub when_full: WhenFull,
    /// redb page cache in bytes; small on purpose to keep RSS low.
    pub cache_size: u64,
}

impl StoreOptions {
    pub fn from_config(c: &crate::config::StoreConfig) -> Self {
        Self {
            path: c.path.clone(),
            max_bytes: c.max_bytes,
            when_full: c.when_full,
            cache_size: c.cache_size,
        }
    }
}

/// Errors of the store. Cloneable because one failed commit answers many callers.
#[derive(Debug, Clone, Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error(
        "store {path} is not an edgesync store or is damaged beyond repair ({detail}); \
         move the file aside (keep it for inspection) and restart to create a new, empty store"
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error("store {path} is in use by another process (is another edgesync running?)")]
    Locked { path: PathBuf },
    #[error("cannot open store {path}: {detail}")]
    Open { path: PathBuf, detail: String },
    #[error(
        "store is full: {needed} bytes needed, {queued} bytes queued and {state} bytes of \
         latest values and desired state held, of store.max_bytes = {max}"
    )]
    Full {
        needed: u64,
        queued: u64,
        max: u64,
        state: u64,
    },
    /// The latest values and desired state would pass their share of `store.max_bytes`.
    #[error(
        "store is full: the latest values would grow by {needed} bytes, and {used} of the {max} \
         bytes the store keeps for latest values and desired state (half of store.max_bytes) \
         are in use; report fewer or smaller keys, or raise store.max_bytes"
    )]
    StateFull { needed: u64, used: u64, max: u64 },
    #[error("store I/O error: {0}")]
    Io(String),
    /// The file system is full (ENOSPC) or over quota (EDQUOT): retrying later may succeed.
    #[error("no space left for the store: {0}")]
    NoSpace(String),
    #[error("store is closed")]
    Closed,
    /// redb failed on a damaged page while reading or writing (it panicked; caught).
    #[error(
        "store {path} is damaged ({detail}); queued changes past the damage cannot be read: \
         keep the file for inspection, move it aside and restart (the new store continues \
         with higher seqs)"
    )]
    Damaged { path: PathBuf, detail: String },
}

impl StoreError {
    /// The error code of docs/PROTOCOL.md §6 for local callers.
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::Full { .. } | StoreError::StateFull { .. } | StoreError::NoSpace(_) => {
                "store-full"
            }
            _ => "io-error",
        }
    }
}

impl From<redb::Error> for StoreError {
    fn from(e: redb::Error) -> Self {
        match &e {
            redb::Error::Io(io) if is_no_space(io) => StoreError::NoSpace(e.to_string()),
            _ => StoreError::Io(e.to_string()),
        }
    }
}

fn is_no_space(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

/// Errors after which redb refuses further work until the database is reopened.
fn needs_reopen(e: &redb::Error) -> bool {
    matches!(
        e,
        redb::Error::Io(_)
            | redb::Error::PreviousIo
            | redb::Error::Backend(_)
            | redb::Error::DatabaseClosed
            | redb::Error::Corrupted(_)
    )
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::from(redb::Error::from(e)) }
        }
    )*};
}
from_redb!(
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// The seqs a successful append got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Appended {
    pub first_seq: u64,
    pub last_seq: u64,
    /// Changes of the request a class's deadband or dedupe held back (not queued, no seq).
    pub filtered: u64,
}

/// Which queued changes the broker acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ack {
    /// Every queued change with `seq <= n`.
    Through(u64),
    /// Every queued change with `first <= seq <= last` (one batch: its seqs are contiguous
    /// among what was queued when it was read, and seqs are never reused).
    Range { first: u64, last: u64 },
    /// Exactly these seqs.
    Seqs(Vec<u64>),
    /// These seqs, whose records are damaged and can never be sent: removed and counted in
    /// `corrupt` instead of `acked`.
    Corrupt(Vec<u64>),
    /// A batch acknowledged around damaged records it skipped: `corrupt` as in
    /// [`Ack::Corrupt`], the rest of `first..=last` as in [`Ack::Range`] (one op, so the
    /// damaged ones are never counted as acked).
    RangeSkipping {
        first: u64,
        last: u64,
        corrupt: Vec<u64>,
    },
}

/// What an ack removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Acked {
    pub changes: u64,
    pub bytes: u64,
}

/// Queue figures and persistent counters, as of the last commit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct QueueStats {
    pub depth: u64,
    pub bytes: u64,
    pub next_seq: u64,
    pub max_bytes: u64,
    pub reported: u64,
    pub acked: u64,
    pub dropped: u64,
    pub rejected: u64,
    /// Damaged records skipped by the sync engine and removed (never sent).
    pub corrupt: u64,
    /// Accounted bytes of the latest values and the desired state (see "Bounds").
    pub state_bytes: u64,
    /// The most `state_bytes` may reach ([`state_allowance`] of `max_bytes`).
    pub max_state_bytes: u64,
}

/// One queued change read back from the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub seq: u64,
    /// The record bytes; decode with [`record::decode`].
    pub record: Vec<u8>,
}

impl Queued {
    pub fn decode(&self) -> Result<record::RecordRef<'_>, record::RecordError> {
        record::decode(&self.record)
    }
}

/// The latest reported value of a key.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReportedValue {
    pub seq: u64,
    pub ts: u64,
    pub value: serde_json::Value,
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Op {
    Append {
        changes: Vec<NewChange>,
        reply: Reply<Appended>,
    },
    Ack {
        ack: Ack,
        reply: Reply<Acked>,
    },
    Transact {
        f: Mutex<Option<TxnFn>>,
        reply: Reply<()>,
    },
    /// Raises a Device Shadow watermark (`shadow::advance`) in whatever commit comes next,
    /// journaled or not: never a checkpoint of its own (issue 16), and not in the journal
    /// record, so a crash may lose it (values then go to the shadow once more).
    ShadowMark {
        shadow: String,
        seq: u64,
    },
    /// Answered by the writer thread without a transaction (see [`Outbox::heartbeat`]).
    Heartbeat {
        reply: oneshot::Sender<()>,
    },
    Shutdown,
}

/// Work run inside a writer transaction (see [`Outbox::transact`]).
type TxnFn = Box<dyn FnOnce(&mut TxnCtx<'_, '_>) -> Result<(), redb::Error> + Send>;

/// What a [`Outbox::transact`] closure gets: the write transaction (for the caller's own
/// tables) and appends to the outbox that commit atomically with them.
pub struct TxnCtx<'t, 'w> {
    pub txn: &'t redb::WriteTransaction,
    outbox: &'w mut Queue<'t>,
    reported: &'w redb::Table<'t, &'static str, (u64, &'static [u8])>,
    writer: &'w mut Writer,
    latest: &'w mut HashMap<String, Latest<Vec<u8>>>,
}

impl std::fmt::Debug for TxnCtx<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxnCtx").finish_non_exhaustive()
    }
}

impl TxnCtx<'_, '_> {
    /// Queues changes in this transaction (bounds apply as for any append).
    pub fn append(
        &mut self,
        changes: &[NewChange],
    ) -> Result<Result<Appended, StoreError>, redb::Error> {
        let latest = &mut *self.latest;
        self.writer.append(
            &mut *self.outbox,
            self.reported,
            changes,
            |c, seq, ts, _| {
                Latest::keep(latest, c, seq, ts);
            },
        )
    }

    /// Drops every change queued (as of this point of the transaction), counted in
    /// `dropped`; returns what went. Changes read and in flight to the broker may still
    /// arrive there; their acknowledgement is then a no-op.
    pub fn purge(&mut self) -> Result<Acked, redb::Error> {
        self.writer.purge(&mut *self.outbox)
    }

    /// Bytes the state may still grow by in this transaction: within its allowance and,
    /// under `reject`, beside what is queued (`drop-oldest` evicts queued changes instead).
    pub fn state_room(&self) -> u64 {
        let w = &*self.writer;
        let left = state_allowance(w.max_bytes).saturating_sub(w.meta.state_bytes);
        match w.when_full {
            WhenFull::DropOldest => left,
            WhenFull::Reject => left.min(
                w.max_bytes
                    .saturating_sub(w.meta.state_bytes)
                    .saturating_sub(w.meta.bytes),
            ),
        }
    }

    /// Accounts a state row (or a reservation) of `old` accounted bytes replaced by one of
    /// `new`. Growth past what the queue leaves evicts the oldest queued changes under
    /// `drop-oldest` (counted in `dropped`).
    pub fn charge_state(&mut self, old: u64, new: u64) -> Result<(), redb::Error> {
        let w = &mut *self.writer;
        w.meta.state_bytes = w.meta.state_bytes.saturating_sub(old).saturating_add(new);
        if new > old && w.when_full == WhenFull::DropOldest {
            let room = w.max_bytes.saturating_sub(w.meta.state_bytes);
            w.evict_to(&mut *self.outbox, room)?;
        }
        Ok(())
    }

    /// Whether the state, with `extra` bytes more, is past its allowance (history is then
    /// trimmed).
    pub fn state_over(&self, extra: u64) -> bool {
        self.writer.meta.state_bytes.saturating_add(extra) > state_allowance(self.writer.max_bytes)
    }

    /// The accounted bytes of `key`'s `reported` row as of this point of the transaction.
    pub fn reported_cost(&self, key: &str) -> Result<u64, redb::Error> {
        self.writer.reported_cost_of(self.reported, key)
    }
}

/// The newest change of a key within one transaction.
struct Latest<V> {
    seq: u64,
    ts: u64,
    value: V,
    origin: Option<&'static str>,
}

impl Latest<Vec<u8>> {
    /// Records `c` (queued as `seq`, stamped `ts`) as its key's latest value in `map`.
    fn keep(map: &mut HashMap<String, Latest<Vec<u8>>>, c: &NewChange, seq: u64, ts: u64) {
        map.insert(
            c.key.clone(),
            Latest {
                seq,
                ts,
                value: c.value.clone(),
                origin: c.origin.tag(),
            },
        );
    }
}

/// Opens the database (again): the file at `StoreOptions::path`, or a test backend.
type Opener = Arc<dyn Fn(&redb::Builder) -> Result<Database, DatabaseError> + Send + Sync>;

struct Shared {
    /// `None` while the writer reopens the store after an I/O error.
    db: RwLock<Option<Database>>,
    path: PathBuf,
    stats: Mutex<QueueStats>,
    /// Write transactions committed since open (group-commit efficiency).
    commits: AtomicU64,
    /// `next_seq` after the last commit: the sync engine wakes on changes.
    appended: watch::Sender<u64>,
    /// Where the writer hands each commit's new records before its fsync ([`Outbox::tail`]).
    tail: Mutex<Option<mpsc::Sender<Vec<Queued>>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Per retention class, since start (empty without `[[store.class]]`).
    class_stats: Mutex<Vec<ClassStats>>,
    /// `meta.written_bytes` at open, and this process's bytes written as last noted.
    written_base: u64,
    written_noted: AtomicU64,
}

/// Handle to the outbox; cheap to clone. See the module docs for its guarantees.
#[derive(Clone)]
pub struct Outbox {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Op>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("path", &self.shared.path)
            .finish_non_exhaustive()
    }
}

impl Outbox {
    /// Opens (or creates) the store and starts its writer thread.
    pub fn open(opts: &StoreOptions) -> Result<Outbox, StoreError> {
        Self::open_classed(opts, &[])
    }

    /// [`Self::open`] with retention classes (`[[store.class]]`; empty: none, as before).
    /// When the classes' globs differ from those the store's class index was made for, the
    /// index is rebuilt once from the queue (logged).
    pub fn open_classed(
        opts: &StoreOptions,
        classes: &[crate::config::StoreClass],
    ) -> Result<Outbox, StoreError> {
        let classes = Classes::new(classes).map(Arc::new);
        prepare_path(opts)?;
        let floor = seq_floor_for(&opts.path);
        let journal_path = journal_path(&opts.path);
        // A new store: a journal left beside an earlier one is not its journal.
        if std::fs::metadata(&opts.path).map_or(true, |m| m.len() == 0) {
            let _ = std::fs::remove_file(&journal_path);
        }
        create_private(&opts.path)?;
        let path = opts.path.clone();
        let opener: Opener = Arc::new(move |b: &redb::Builder| b.create(&path));
        let journal = || -> Option<Box<dyn StorageBackend>> {
            match journal::JournalFile::open(&journal_path) {
                Ok(f) => Some(Box::new(f)),
                Err(e) => {
                    tracing::warn!(
                        path = %journal_path.display(),
                        "cannot open the store journal ({e}): every commit is a durable \
                         store commit (more writes to flash)"
                    );
                    None
                }
            }
        };
        let first =
            Self::open_with_floor(opts, Arc::clone(&opener), floor, journal(), classes.clone());
        match first {
            Err(StoreError::Corrupt { .. }) if set_aside_incomplete(&opts.path)? => {
                // It never held a commit, so it never handed out a seq: no floor needed.
                let _ = std::fs::remove_file(&journal_path);
                create_private(&opts.path)?;
                Self::open_with_floor(opts, opener, floor, journal(), classes)
            }
            r => r,
        }
    }

    /// Opens (or creates) a store on `backend` instead of a file: the fault-injection tests
    /// run the real writer on a backend that cuts power or fails I/O. `opts.path` only names
    /// it in messages. Reopening after an I/O error uses a clone of `backend`, which must
    /// share its contents (like reopening the same file).
    pub fn open_with_backend<B: StorageBackend + Clone>(
        backend: B,
        opts: &StoreOptions,
    ) -> Result<Outbox, StoreError> {
        Self::open_with_floor(
            opts,
            Arc::new(move |b: &redb::Builder| b.create_with_backend(backend.clone())),
            None,
            None,
            None,
        )
    }

    /// [`Self::open_with_backend`] with the journal on a backend of its own (every commit
    /// is durable without one).
    pub fn open_with_backends<B: StorageBackend + Clone, J: StorageBackend>(
        backend: B,
        journal: J,
        opts: &StoreOptions,
    ) -> Result<Outbox, StoreError> {
        Self::open_with_floor(
            opts,
            Arc::new(move |b: &redb::Builder| b.create_with_backend(backend.clone())),
            None,
            Some(Box::new(journal)),
            None,
        )
    }

    /// `floor`: where a new store's seqs start, if not at 1 (see [`seq_floor_for`]).
    fn open_with_floor(
        opts: &StoreOptions,
        opener: Opener,
        floor: Option<u64>,
        journal: Option<Box<dyn StorageBackend>>,
        classes: Option<Arc<Classes>>,
    ) -> Result<Outbox, StoreError> {
        let path = opts.path.clone();
        let db = open_db(opts, &opener)?;
        let meta = Meta::load_or_init(&db, floor).map_err(|e| classify_open_error(&path, e))?;
        sync_class_index(&db, classes.as_deref()).map_err(|e| classify_open_error(&path, e))?;
        let stats = meta.stats(opts.max_bytes);
        if stats.state_bytes > stats.max_state_bytes {
            tracing::warn!(
                state_bytes = stats.state_bytes,
                max_state_bytes = stats.max_state_bytes,
                "the latest values and desired state take more than half of store.max_bytes: \
                 reports that add keys or grow values are refused until store.max_bytes is raised"
            );
        }
        let shared = Arc::new(Shared {
            db: RwLock::new(Some(db)),
            path,
            stats: Mutex::new(stats),
            commits: AtomicU64::new(0),
            appended: watch::Sender::new(stats.next_seq),
            tail: Mutex::new(None),
            writer: Mutex::new(None),
            class_stats: Mutex::new(Vec::new()),
            written_base: meta.written_bytes,
            written_noted: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        let mut writer = Writer {
            shared: Arc::clone(&shared),
            durable_reserved: meta.seq_reserved,
            tail_buf: Vec::new(),
            collect_tail: false,
            tail_sent: false,
            meta,
            max_bytes: opts.max_bytes,
            when_full: opts.when_full,
            buf: Vec::new(),
            opts: opts.clone(),
            opener,
            broken: None,
            pending_rows: HashMap::new(),
            journal: None,
            replaying: false,
            class_counters: vec![
                ClassCounters::default();
                classes.as_ref().map_or(0, |c| c.count())
            ],
            classes,
            pending_last: HashMap::new(),
        };
        writer.publish_class_stats();
        if let Some(backend) = journal {
            let (j, records) = match journal::Journal::open(backend, meta.wal_epoch) {
                Ok(opened) => opened,
                // Not made yet (e.g. a full disk): it never held a record.
                Err(journal::OpenError::Make(e)) => {
                    tracing::warn!(
                        path = %journal_path(&opts.path).display(),
                        "cannot make the store journal ({e}): every commit is a durable \
                         store commit (more writes to flash) until the next start"
                    );
                    (None, Vec::new())
                }
                Err(journal::OpenError::Read(e)) => {
                    return Err(StoreError::Open {
                        path: journal_path(&opts.path),
                        detail: format!("cannot read the store journal: {e}"),
                    });
                }
            };
            writer.journal = j;
            match writer.replay(records) {
                Ok(()) => {}
                // A full disk (or an I/O fault) cannot take the checkpoint now: the records
                // stay in the journal, and the writer answers with the fault and replays
                // them when it reopens the store (as after a failed commit).
                Err(
                    e @ (redb::Error::Io(_) | redb::Error::PreviousIo | redb::Error::Backend(_)),
                ) => {
                    let error = StoreError::from(e);
                    tracing::warn!(error = %error, "the store journal cannot be replayed yet; retrying");
                    writer.broken = Some(Broken {
                        error,
                        retry_at: Instant::now() + REOPEN_MIN,
                        delay: REOPEN_MIN,
                    });
                }
                Err(e) => return Err(classify_open_error(&opts.path, e)),
            }
            *lock(&shared.stats) = writer.meta.stats(opts.max_bytes);
            shared.appended.send_replace(writer.meta.next_seq);
        }
        let handle = std::thread::Builder::new()
            .name("edgesync-store".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Io(format!("cannot start the store writer: {e}")))?;
        *lock(&shared.writer) = Some(handle);
        Ok(Outbox { shared, tx })
    }

    /// The store's file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Queues the changes of one request, all or nothing; returns once they are durable.
    pub async fn append(&self, changes: Vec<NewChange>) -> Result<Appended, StoreError> {
        self.submit(changes)
            .await?
            .await
            .unwrap_or(Err(StoreError::Closed))
    }

    /// Hands a request to the writer and returns the receiver of its answer at once, so a
    /// connection can pipeline requests and answer them in order.
    pub async fn submit(
        &self,
        changes: Vec<NewChange>,
    ) -> Result<oneshot::Receiver<Result<Appended, StoreError>>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Op::Append { changes, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(rx)
    }

    /// Deletes acknowledged changes (batched with other writes); returns what was removed.
    pub async fn ack(&self, ack: Ack) -> Result<Acked, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Op::Ack { ack, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Runs `f` inside the writer's next transaction, with everything else of that group
    /// commit, and returns its result once committed and fsync'ed. `f` writes its own tables
    /// through `ctx.txn` and may append to the outbox through `ctx.append`: all of it commits
    /// together or not at all. An `Err` from `f` fails the whole group: return domain
    /// refusals inside `T`, errors only for storage failures.
    pub async fn transact<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut TxnCtx<'_, '_>) -> Result<T, redb::Error> + Send + 'static,
    ) -> Result<T, StoreError> {
        let slot = Arc::new(Mutex::new(None));
        let out = Arc::clone(&slot);
        let f: TxnFn = Box::new(move |ctx| {
            let v = f(ctx)?;
            *lock(&out) = Some(v);
            Ok(())
        });
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Op::Transact {
                f: Mutex::new(Some(f)),
                reply,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.unwrap_or(Err(StoreError::Closed))?;
        let v = lock(&slot).take();
        v.ok_or(StoreError::Closed)
    }

    /// Round-trips the writer thread without a transaction or fsync: answers once the writer
    /// took it, i.e. after the commits of everything submitted before it. A writer stuck
    /// (e.g. in an fsync that never returns) never answers: the systemd watchdog's probe
    /// ([`crate::sys::notify`]).
    pub async fn heartbeat(&self) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Op::Heartbeat { reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)
    }

    /// Drops every queued change (the `purge` command), counted in `dropped`; returns what
    /// went once durable. See [`TxnCtx::purge`].
    pub async fn purge(&self) -> Result<Acked, StoreError> {
        self.transact(|ctx| ctx.purge()).await
    }

    /// A read transaction, for modules with their own tables.
    pub fn read(&self) -> Result<redb::ReadTransaction, StoreError> {
        self.shared.begin_read()
    }

    /// Figures as of the last commit (no I/O).
    pub fn stats(&self) -> QueueStats {
        *lock(&self.shared.stats)
    }

    /// Records of each commit from now on, handed over just before the commit's fsync (see
    /// "Sent while the fsync runs" in the module docs): each message holds consecutive seqs
    /// in order; commits larger than a backlog threshold, and commits before a reservation
    /// is durable, are not handed over (read them from the store after [`Self::watch_appended`]
    /// fires). The records are not durable yet: a receiver may publish them but must not
    /// treat them as queued. Replaces an earlier receiver; dropping it stops the hand-over.
    /// At most [`TAIL_DEPTH`] commits wait in it: when the receiver falls behind, later
    /// commits are not handed over (it reads them from the store, as for large commits).
    pub fn tail(&self) -> mpsc::Receiver<Vec<Queued>> {
        let (tx, rx) = mpsc::channel(TAIL_DEPTH);
        *lock(&self.shared.tail) = Some(tx);
        rx
    }

    /// Watches `next_seq` as of the last commit; it changes whenever changes were appended.
    pub fn watch_appended(&self) -> watch::Receiver<u64> {
        self.shared.appended.subscribe()
    }

    /// Write transactions (fsyncs) committed since open.
    pub fn commits(&self) -> u64 {
        self.shared.commits.load(Ordering::Relaxed)
    }

    /// Timestamp of the oldest queued change.
    pub fn oldest_ts(&self) -> Result<Option<u64>, StoreError> {
        guarded(&self.shared.path, || {
            let txn = self.shared.begin_read()?;
            let table = txn.open_table(OUTBOX)?;
            let first = table.first()?;
            Ok(first.and_then(|(_, v)| record::decode(v.value()).ok().map(|r| r.ts)))
        })
    }

    /// Reads queued changes in seq order starting at `from_seq`: at most `max_changes`, and
    /// no more records than fit in `max_bytes` (but always at least one if any is queued).
    pub fn read_from(
        &self,
        from_seq: u64,
        max_changes: usize,
        max_bytes: usize,
    ) -> Result<Vec<Queued>, StoreError> {
        guarded(&self.shared.path, || {
            let txn = self.shared.begin_read()?;
            let table = txn.open_table(OUTBOX)?;
            let mut out = Vec::new();
            let mut bytes = 0usize;
            for item in table.range(from_seq..)? {
                let (k, v) = item?;
                let rec = v.value();
                if out.len() >= max_changes || (!out.is_empty() && bytes + rec.len() > max_bytes) {
                    break;
                }
                bytes += rec.len();
                out.push(Queued {
                    seq: k.value(),
                    record: rec.to_vec(),
                });
            }
            Ok(out)
        })
    }

    /// The latest reported record of a key with its seq (the record may carry an origin).
    pub fn reported_raw(&self, key: &str) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        guarded(&self.shared.path, || {
            let txn = self.shared.begin_read()?;
            let table = txn.open_table(REPORTED)?;
            Ok(table.get(key)?.map(|v| {
                let (seq, rec) = v.value();
                (seq, rec.to_vec())
            }))
        })
    }

    /// Whether the change `seq` is still queued (not yet acknowledged by the broker).
    pub fn is_queued(&self, seq: u64) -> Result<bool, StoreError> {
        guarded(&self.shared.path, || {
            let txn = self.shared.begin_read()?;
            let table = txn.open_table(OUTBOX)?;
            Ok(table.get(seq)?.is_some())
        })
    }

    /// The latest reported value of one key, or of all keys.
    pub fn reported(
        &self,
        key: Option<&str>,
    ) -> Result<std::collections::BTreeMap<String, ReportedValue>, StoreError> {
        guarded(&self.shared.path, || {
            let txn = self.shared.begin_read()?;
            let table = txn.open_table(REPORTED)?;
            let mut out = std::collections::BTreeMap::new();
            let mut add = |k: &str, (seq, rec): (u64, &[u8])| -> Result<(), StoreError> {
                let r = record::decode(rec).map_err(|e| StoreError::Io(e.to_string()))?;
                let value = crate::model::change::decode_value(r.value)
                    .map_err(|e| StoreError::Io(e.to_string()))?;
                out.insert(
                    k.to_owned(),
                    ReportedValue {
                        seq,
                        ts: r.ts,
                        value,
                    },
                );
                Ok(())
            };
            match key {
                Some(k) => {
                    if let Some(v) = table.get(k)? {
                        add(k, v.value())?;
                    }
                }
                None => {
                    for item in table.iter()? {
                        let (k, v) = item?;
                        add(k.value(), v.value())?;
                    }
                }
            }
            Ok(out)
        })
    }

    /// Stops the writer after the requests already submitted, and waits for it. Later
    /// requests fail with [`StoreError::Closed`]. The file is closed when the last handle drops.
    pub async fn shutdown(&self) {
        let _ = self.tx.send(Op::Shutdown).await;
        let handle = lock(&self.shared.writer).take();
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }

    /// Blocking variant of [`Outbox::shutdown`] for non-async callers (tests, tools).
    pub fn shutdown_blocking(&self) {
        let _ = self.tx.blocking_send(Op::Shutdown);
        let handle = lock(&self.shared.writer).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Shared {
    fn begin_read(&self) -> Result<redb::ReadTransaction, StoreError> {
        let db = self.db.read().unwrap_or_else(PoisonError::into_inner);
        match db.as_ref() {
            Some(db) => Ok(db.begin_read()?),
            None => Err(StoreError::Io(
                "the store is being reopened after an I/O error".into(),
            )),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs a read of the store. redb panics on some damaged pages ("entered unreachable
/// code" in its cursor); in builds that unwind that becomes [`StoreError::Damaged`]
/// instead of killing the caller (the drain, a local request). The shipped build aborts on
/// a panic instead (see [`crate::sys::fatal`]).
fn guarded<T>(path: &Path, f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
    let what = format!("reading the store {}", path.display());
    match std::panic::catch_unwind(AssertUnwindSafe(|| crate::sys::fatal::during(what, f))) {
        Ok(r) => r,
        Err(_) => Err(StoreError::Damaged {
            path: path.to_path_buf(),
            detail: "redb failed on a damaged page while reading it".into(),
        }),
    }
}

/// The journal beside the store file: `PATH.journal`.
pub fn journal_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".journal");
    PathBuf::from(p)
}

fn prepare_path(opts: &StoreOptions) -> Result<(), StoreError> {
    let path = &opts.path;
    if path.is_dir() {
        return Err(StoreError::Open {
            path: path.clone(),
            detail: "it is a directory; store.path must name a file".into(),
        });
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| StoreError::Open {
            path: path.clone(),
            detail: format!("cannot create directory {}: {e}", parent.display()),
        })?;
    }
    Ok(())
}

/// Where a new store's seqs start when an earlier store may have existed: Unix ms × 1000.
/// A store numbers its changes consecutively from its floor, so an earlier store created
/// at time T0 and a new one at T1 > T0 never overlap unless the earlier one averaged more
/// than 1,000 changes per millisecond (a million per second) over T1 − T0, far above what
/// the agent can commit. Stays below 2^53 (exact in JSON numbers) until the year 2255.
/// A clock set behind the earlier store's creation defeats it.
pub fn clock_seq_floor() -> u64 {
    now_ms().saturating_mul(1000)
}

/// `Some(floor)` when the store at `path` is about to be created although an earlier store
/// may have handed out seqs: the file exists with 0 bytes (redb would silently initialise
/// it), or a file set aside next to it (`PATH.something`, as the error messages advise)
/// exists. A missing file with nothing set aside is a first start: seqs start at 1.
fn seq_floor_for(path: &Path) -> Option<u64> {
    let existed_empty = std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == 0);
    if existed_empty {
        tracing::error!(
            path = %path.display(),
            "the store file is empty (0 bytes): whatever it held is lost; creating a new store"
        );
        return Some(clock_seq_floor());
    }
    if path.exists() {
        return None;
    }
    let name = path.file_name()?.to_string_lossy().into_owned();
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let aside = std::fs::read_dir(dir).ok()?.flatten().find(|e| {
        e.file_name()
            .to_string_lossy()
            .strip_prefix(&name)
            .is_some_and(|rest| rest.starts_with('.'))
    })?;
    tracing::warn!(
        path = %path.display(),
        aside = %aside.path().display(),
        "creating a new store next to an earlier one set aside"
    );
    Some(clock_seq_floor())
}

/// Creates a missing store file readable by its owner only (0600; redb would create it
/// with the umask's mode, usually 0644). An existing file keeps its mode.
fn create_private(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StoreError::Open {
            path: path.to_path_buf(),
            detail: format!("cannot create it: {e}"),
        }),
    }
}

/// Longest file redb's creation leaves before it writes the magic number (its initial
/// layout is 72 KiB); larger files are never set aside.
const INCOMPLETE_MAX_LEN: u64 = 1 << 20;

/// redb creates a file in steps: set its length, write the header without the magic
/// number, sync, write the magic number, sync. A power cut before the last step leaves a
/// small file whose first 9 bytes are zero, which redb refuses ("magic number mismatch")
/// at every start. It never held a commit, so it is set aside (kept for inspection) and
/// a new store is created. Any other file that fails to open stays refused and untouched.
/// Returns whether the file was set aside.
fn set_aside_incomplete(path: &Path) -> Result<bool, StoreError> {
    use std::io::Read;
    let open_err = |e: std::io::Error| StoreError::Open {
        path: path.to_path_buf(),
        detail: e.to_string(),
    };
    let Ok(file) = std::fs::File::open(path) else {
        return Ok(false);
    };
    let len = file.metadata().map_err(open_err)?.len();
    if len == 0 || len > INCOMPLETE_MAX_LEN {
        return Ok(false);
    }
    let mut magic = Vec::with_capacity(9);
    file.take(9).read_to_end(&mut magic).map_err(open_err)?;
    if magic.iter().any(|b| *b != 0) {
        return Ok(false);
    }
    let mut aside = path.as_os_str().to_owned();
    aside.push(".incomplete");
    let aside = PathBuf::from(aside);
    std::fs::rename(path, &aside).map_err(open_err)?;
    tracing::warn!(
        path = %path.display(),
        aside = %aside.display(),
        "the store file's creation never completed (e.g. a power cut while it was created); \
         set it aside and creating a new store"
    );
    Ok(true)
}

fn open_db(opts: &StoreOptions, opener: &Opener) -> Result<Database, StoreError> {
    let path = &opts.path;
    let mut builder = Database::builder();
    builder.set_cache_size(usize::try_from(opts.cache_size).unwrap_or(usize::MAX));
    // redb may panic on a file corrupted outside of it; a damaged file must be an error.
    let opened = std::panic::catch_unwind(AssertUnwindSafe(|| opener(&builder)));
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => Err(classify_open_error(path, e.into())),
        Err(_) => Err(StoreError::Corrupt {
            path: path.clone(),
            detail: "redb failed while reading it".into(),
        }),
    }
}

fn classify_open_error(path: &Path, e: redb::Error) -> StoreError {
    let path = path.to_path_buf();
    match e {
        redb::Error::Io(io) if is_no_space(&io) => {
            StoreError::NoSpace(format!("{}: {io}", path.display()))
        }
        redb::Error::DatabaseAlreadyOpen => StoreError::Locked { path },
        redb::Error::Corrupted(detail) => StoreError::Corrupt { path, detail },
        redb::Error::RepairAborted => StoreError::Corrupt {
            path,
            detail: "repair aborted".into(),
        },
        redb::Error::UpgradeRequired(v) => StoreError::Open {
            path,
            detail: format!("file format {v} needs an upgrade this version cannot do"),
        },
        redb::Error::TableTypeMismatch { .. } | redb::Error::TableIsMultimap(_) => {
            StoreError::Corrupt {
                path,
                detail: "it is a redb file of another program".into(),
            }
        }
        redb::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock => {
            StoreError::Locked { path }
        }
        redb::Error::Io(io) if io.kind() == std::io::ErrorKind::InvalidData => {
            StoreError::Corrupt {
                path,
                detail: io.to_string(),
            }
        }
        other => StoreError::Open {
            path,
            detail: other.to_string(),
        },
    }
}

/// The `meta` table, mirrored in the writer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Meta {
    pub next_seq: u64,
    pub depth: u64,
    pub bytes: u64,
    pub reported: u64,
    pub acked: u64,
    pub dropped: u64,
    pub rejected: u64,
    pub corrupt: u64,
    /// Seqs below it may have been handed to the sync engine before their commit: never
    /// reuse them (see "Sent while the fsync runs").
    pub seq_reserved: u64,
    /// Accounted bytes of the state tables (see "Bounds").
    pub state_bytes: u64,
    /// Checkpoints so far: journal records of this epoch follow the last one.
    pub wal_epoch: u64,
    /// Journal records of this epoch whose commits this state includes (redb persists the
    /// non-durable commits when it closes): a replay skips them.
    pub wal_records: u64,
    /// Bytes this agent has written over the store's life (see [`Outbox::note_written`]).
    pub written_bytes: u64,
}

impl Meta {
    /// The figures as committed in `txn`: zero for a field (or a store) without them.
    pub fn read(txn: &redb::ReadTransaction) -> Result<Meta, redb::Error> {
        let mut meta = Meta::default();
        match txn.open_table(META) {
            Ok(t) => {
                for (name, field) in Self::FIELDS.iter().zip(meta.fields_mut()) {
                    if let Some(v) = t.get(*name)? {
                        *field = v.value();
                    }
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(meta)
    }

    const FIELDS: [&'static str; 13] = [
        "next_seq",
        "depth",
        "bytes",
        "reported",
        "acked",
        "dropped",
        "rejected",
        "seq_reserved",
        "corrupt",
        "state_bytes",
        "wal_epoch",
        "wal_records",
        "written_bytes",
    ];

    fn fields_mut(&mut self) -> [&mut u64; 13] {
        [
            &mut self.next_seq,
            &mut self.depth,
            &mut self.bytes,
            &mut self.reported,
            &mut self.acked,
            &mut self.dropped,
            &mut self.rejected,
            &mut self.seq_reserved,
            &mut self.corrupt,
            &mut self.state_bytes,
            &mut self.wal_epoch,
            &mut self.wal_records,
            &mut self.written_bytes,
        ]
    }

    /// Reads `meta`, creating the tables on a new store and repairing the figures if they
    /// lag the queue. Commits only then: a store that needs no change opens without a
    /// write (none that could fail on a full disk).
    fn load_or_init(db: &Database, floor: Option<u64>) -> Result<Meta, redb::Error> {
        let txn = db.begin_write()?;
        let mut changed = false;
        let meta = {
            let reported = txn.open_table(REPORTED)?;
            let outbox = txn.open_table(OUTBOX)?;
            let mut table = txn.open_table(META)?;
            let fresh = table.get("next_seq")?.is_none();
            let mut meta = Meta {
                next_seq: match floor {
                    Some(f) if fresh => {
                        tracing::warn!(
                            next_seq = f,
                            "new store where an earlier one existed: seqs start at a floor from \
                             the clock (Unix ms × 1000), above every seq the earlier store can \
                             have sent, so receivers deduplicating by (device, seq) keep the new data"
                        );
                        f.max(1)
                    }
                    _ => 1,
                },
                ..Meta::default()
            };
            let mut state_missing = false;
            for (name, field) in Self::FIELDS.iter().zip(meta.fields_mut()) {
                match table.get(*name)? {
                    Some(v) => *field = v.value(),
                    // Stores of earlier versions have none; the next commit writes it.
                    None if matches!(
                        *name,
                        "seq_reserved" | "corrupt" | "wal_records" | "written_bytes"
                    ) => {}
                    // A new store: an epoch from the clock, so that a journal left by an
                    // earlier store at this path never matches it.
                    None if *name == "wal_epoch" => {
                        if fresh {
                            *field = now_ms();
                            changed = true;
                        }
                    }
                    None => {
                        state_missing |= *name == "state_bytes";
                        changed = true;
                    }
                }
            }
            // Stores of earlier versions did not count their state: count it once.
            if state_missing {
                let mut total = 0u64;
                for item in reported.iter()? {
                    let (k, v) = item?;
                    total += reported_row_cost(k.value(), v.value().1.len());
                }
                drop(reported);
                total += crate::store::desired::state_cost(&txn)?;
                if total > 0 {
                    tracing::info!(
                        state_bytes = total,
                        "counted the store's latest values and desired state"
                    );
                }
                meta.state_bytes = total;
            }
            // A crash (or a failed commit) may have left seqs up to the reservation with the
            // broker: continue after them. In memory only, so that an open needs no write;
            // the next commit persists it.
            if meta.seq_reserved > meta.next_seq {
                tracing::info!(
                    next_seq = meta.next_seq,
                    seq_reserved = meta.seq_reserved,
                    "continuing at the reserved seq (seqs in between may have been sent before an unclean stop)"
                );
                meta.next_seq = meta.seq_reserved;
            }
            meta.seq_reserved = meta.seq_reserved.max(meta.next_seq);
            // Defensive: seqs must never be reused, even if meta lagged the data.
            if let Some((last, _)) = outbox.last()? {
                let last = last.value();
                if meta.next_seq <= last {
                    tracing::warn!(
                        next_seq = meta.next_seq,
                        last,
                        "store metadata behind the queue; raising next_seq"
                    );
                    meta.next_seq = last + 1;
                    changed = true;
                }
            } else if meta.depth != 0 || meta.bytes != 0 {
                tracing::warn!(
                    depth = meta.depth,
                    "store metadata counts changes in an empty queue; resetting"
                );
                meta.depth = 0;
                meta.bytes = 0;
                changed = true;
            }
            if changed {
                meta.store(&mut table)?;
            }
            meta
        };
        if changed {
            txn.commit()?;
        } else {
            txn.abort()?;
        }
        Ok(meta)
    }

    fn store(&self, table: &mut redb::Table<&str, u64>) -> Result<(), redb::Error> {
        let mut copy = *self;
        for (name, value) in Self::FIELDS.iter().zip(copy.fields_mut()) {
            table.insert(*name, *value)?;
        }
        Ok(())
    }

    fn stats(&self, max_bytes: u64) -> QueueStats {
        QueueStats {
            depth: self.depth,
            bytes: self.bytes,
            next_seq: self.next_seq,
            max_bytes,
            reported: self.reported,
            acked: self.acked,
            dropped: self.dropped,
            rejected: self.rejected,
            corrupt: self.corrupt,
            state_bytes: self.state_bytes,
            max_state_bytes: state_allowance(max_bytes),
        }
    }
}

// Bytes written (issue 16): the agent's own `write_bytes` (/proc/self/io), kept over the
// store's life in `meta.written_bytes`. Persisted only by commits made anyway: a commit of
// its own would itself wear the card.

impl Outbox {
    /// Notes `process_total`, this process's bytes written so far; returns the lifetime
    /// total (what earlier runs persisted, plus it). The writer's next commit persists it.
    pub fn note_written(&self, process_total: u64) -> u64 {
        self.shared
            .written_noted
            .fetch_max(process_total, Ordering::Relaxed);
        self.shared.written_lifetime()
    }
}

impl Shared {
    /// Absolute, not a delta: a failed commit loses nothing, the next one writes it again.
    fn written_lifetime(&self) -> u64 {
        self.written_base
            .saturating_add(self.written_noted.load(Ordering::Relaxed))
    }
}

fn cost(record_len: usize) -> u64 {
    record_len as u64 + RECORD_OVERHEAD
}

/// The one thread that writes to the store.
struct Writer {
    shared: Arc<Shared>,
    meta: Meta,
    /// `seq_reserved` as last committed: seqs below it are never reused, even after a crash.
    durable_reserved: u64,
    /// This commit's new records, for the tail ([`Outbox::tail`]).
    tail_buf: Vec<Queued>,
    collect_tail: bool,
    /// The current commit's records were handed over before its fsync.
    tail_sent: bool,
    max_bytes: u64,
    when_full: WhenFull,
    buf: Vec<u8>,
    opts: StoreOptions,
    opener: Opener,
    /// Set after a commit failed with an I/O error: redb must be reopened first.
    broken: Option<Broken>,
    /// Accounted cost of each `reported` row as this transaction leaves it (its rows are
    /// written at its end).
    pending_rows: HashMap<String, u64>,
    /// Small commits are journal records plus non-durable redb commits; `None`: every
    /// commit is durable (no journal file could be made, or a test backend without one).
    journal: Option<journal::Journal>,
    /// Applying journal records at open: what was acknowledged is never refused again.
    replaying: bool,
    /// `[[store.class]]`; `None`: no class index, eviction oldest first as before.
    classes: Option<Arc<Classes>>,
    /// Per class, since start (rolled back with a failed commit).
    class_counters: Vec<ClassCounters>,
    /// With classes: each key's last queued change as this transaction leaves it (seq, ts,
    /// value; the value only when a class filters).
    pending_last: HashMap<String, (u64, u64, Vec<u8>)>,
}

struct Broken {
    /// What requests are answered with until the store is reopened.
    error: StoreError,
    retry_at: Instant,
    delay: Duration,
}

enum Outcome {
    Appended(Result<Appended, StoreError>),
    Acked(Acked),
    Done,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Op>) {
        let mut batch: Vec<Op> = Vec::new();
        // Test hook of debug builds only (see crate::sys::notify): a writer that hangs.
        let stall = crate::sys::notify::DebugStall::from_env(crate::sys::notify::STALL_WRITER_VAR);
        while let Some(first) = rx.blocking_recv() {
            stall.block_if_due();
            let mut changes = op_changes(&first);
            batch.push(first);
            while changes < MAX_TXN_CHANGES {
                match rx.try_recv() {
                    Ok(op) => {
                        changes += op_changes(&op);
                        batch.push(op);
                    }
                    Err(_) => break,
                }
            }
            let stop = batch.iter().any(|op| matches!(op, Op::Shutdown));
            // Heartbeats need no transaction; answered once the rest is committed.
            let probes: Vec<Op> = batch
                .extract_if(.., |op| matches!(op, Op::Heartbeat { .. }))
                .collect();
            if !batch.is_empty() {
                self.commit_batch(&mut batch);
            }
            for op in probes {
                if let Op::Heartbeat { reply } = op {
                    let _ = reply.send(());
                }
            }
            if stop {
                self.release_reservation();
                break;
            }
        }
        // Requests still queued are answered with `Closed` as their senders drop.
    }

    /// On a clean stop, nothing handed over early is in doubt: give the reserved seqs back,
    /// so that a restart continues without a gap, in a checkpoint, so that a restart has no
    /// journal to replay. Best effort (a gap is harmless; the journal is replayed).
    fn release_reservation(&mut self) {
        let journaled = self.journal.as_ref().is_some_and(|j| !j.is_empty());
        if self.broken.is_some() || (self.meta.seq_reserved <= self.meta.next_seq && !journaled) {
            return;
        }
        let before = self.meta;
        self.meta.seq_reserved = self.meta.next_seq;
        self.meta.wal_epoch += 1;
        self.meta.wal_records = 0;
        let db = self
            .shared
            .db
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let done = db.as_ref().map(|db| -> Result<(), redb::Error> {
            let mut txn = db.begin_write()?;
            txn.set_durability(Durability::Immediate)?;
            {
                let mut meta = txn.open_table(META)?;
                self.meta.store(&mut meta)?;
            }
            txn.commit()?;
            Ok(())
        });
        match done {
            Some(Err(e)) => {
                tracing::debug!("releasing the reserved seqs failed: {e}");
                self.meta = before;
            }
            Some(Ok(())) => {
                if let Some(j) = &mut self.journal {
                    j.restart(self.meta.wal_epoch);
                }
            }
            None => {}
        }
    }

    /// Reopens the store if a failed commit left redb refusing work and the backoff has
    /// passed; returns the error to answer with while it stays unusable.
    fn ensure_open(&mut self) -> Result<(), StoreError> {
        let Some(broken) = &self.broken else {
            return Ok(());
        };
        if Instant::now() < broken.retry_at {
            return Err(broken.error.clone());
        }
        let delay = broken.delay;
        let mut db = self
            .shared
            .db
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        // The old handle must be closed first: it holds the file lock.
        drop(db.take());
        let reopened = open_db(&self.opts, &self.opener).and_then(|new| {
            let meta = Meta::load_or_init(&new, None)
                .map_err(|e| classify_open_error(&self.opts.path, e))?;
            Ok((new, meta))
        });
        match reopened {
            Ok((new, meta)) => {
                *db = Some(new);
                drop(db);
                tracing::info!("store reopened after an I/O error");
                self.broken = None;
                // What is on disk is the truth now (a failed commit may or may not be there).
                self.meta = meta;
                self.durable_reserved = meta.seq_reserved;
                // The journal's records since the checkpoint now on disk, again.
                // Deletions that waited in memory are lost with the old handle's state:
                // applied again after the journal's records, so that acknowledged changes
                // still leave the queue on this connection.
                let records = match &mut self.journal {
                    Some(j) => {
                        let waiting = j.take_pending();
                        j.reread(meta.wal_epoch).map(|mut r| {
                            if !waiting.is_empty() {
                                r.push(journal::Record {
                                    seq_reserved: 0,
                                    entries: waiting,
                                });
                            }
                            r
                        })
                    }
                    .map_err(redb::Error::Io),
                    None => Ok(Vec::new()),
                };
                let replayed = records.and_then(|records| self.replay(records));
                if let Err(e) = replayed {
                    let error = StoreError::from(e);
                    tracing::warn!(error = %error, "replaying the store journal failed; retrying later");
                    self.broken = Some(Broken {
                        error: error.clone(),
                        retry_at: Instant::now() + REOPEN_MAX,
                        delay: REOPEN_MAX,
                    });
                    return Err(error);
                }
                self.publish_stats();
                Ok(())
            }
            Err(e) => {
                drop(db);
                // A reopen refused for another reason (e.g. the old handle not closed yet)
                // keeps answering with the fault that broke the store.
                let error = match e {
                    e @ (StoreError::NoSpace(_) | StoreError::Io(_)) => e,
                    other => {
                        tracing::debug!(error = %other, "reopen refused");
                        broken.error.clone()
                    }
                };
                tracing::warn!(error = %error, "reopening the store failed; retrying later");
                let delay = (delay * 2).min(REOPEN_MAX);
                self.broken = Some(Broken {
                    error: error.clone(),
                    retry_at: Instant::now() + delay,
                    delay,
                });
                Err(error)
            }
        }
    }

    fn publish_class_stats(&self) {
        if let Some(c) = &self.classes {
            *lock(&self.shared.class_stats) = (0..c.count())
                .map(|i| ClassStats {
                    name: c.name(i as ClassId).to_owned(),
                    priority: c.priority(i as ClassId),
                    counters: self.class_counters[i],
                })
                .collect();
        }
    }

    fn publish_stats(&self) {
        self.publish_class_stats();
        *lock(&self.shared.stats) = self.meta.stats(self.max_bytes);
        self.shared.appended.send_if_modified(|n| {
            let changed = *n != self.meta.next_seq;
            *n = self.meta.next_seq;
            changed
        });
    }

    fn fail_batch(batch: &mut Vec<Op>, err: &StoreError) {
        for op in batch.drain(..) {
            match op {
                Op::Append { reply, .. } => {
                    let _ = reply.send(Err(err.clone()));
                }
                Op::Ack { reply, .. } => {
                    let _ = reply.send(Err(err.clone()));
                }
                Op::Transact { reply, .. } => {
                    let _ = reply.send(Err(err.clone()));
                }
                Op::ShadowMark { .. } | Op::Heartbeat { .. } | Op::Shutdown => {}
            }
        }
    }

    fn commit_batch(&mut self, batch: &mut Vec<Op>) {
        if let Err(err) = self.ensure_open() {
            Self::fail_batch(batch, &err);
            return;
        }
        let before = self.meta;
        let counted = self.classes.as_ref().map(|_| self.class_counters.clone());
        let mark = self.journal.as_ref().map(journal::Journal::mark);
        self.tail_sent = false;
        // redb may panic on a damaged page (e.g. deleting acked changes): a store fault
        // like a failed commit (reopened, retried), not a dead writer thread.
        let what = format!("writing the store {}", self.opts.path.display());
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            crate::sys::fatal::during(what, || self.apply(batch))
        }))
        .unwrap_or_else(|_| {
            Err(redb::Error::Corrupted(
                "redb failed on a damaged page while writing it".into(),
            ))
        });
        let outcomes = match result {
            Ok((outcomes, durable)) => {
                if durable {
                    self.durable_reserved = self.meta.seq_reserved;
                }
                outcomes
            }
            Err(e) => {
                self.meta = before;
                if let Some(c) = counted {
                    self.class_counters = c;
                }
                // Its journal record (if written) is overwritten by the next one: later
                // records follow the state without it.
                if let (Some(j), Some(mark)) = (&mut self.journal, mark) {
                    j.rollback(mark);
                }
                if self.tail_sent {
                    // Its records may be at the broker already: never reuse their seqs.
                    self.meta.next_seq = self.meta.next_seq.max(self.durable_reserved);
                }
                let reopen = needs_reopen(&e);
                let err = StoreError::from(e);
                tracing::error!(error = %err, "store commit failed");
                if reopen {
                    self.broken = Some(Broken {
                        error: err.clone(),
                        retry_at: Instant::now() + REOPEN_MIN,
                        delay: REOPEN_MIN,
                    });
                }
                Self::fail_batch(batch, &err);
                return;
            }
        };
        self.shared.commits.fetch_add(1, Ordering::Relaxed);
        self.publish_stats();
        let mut outcomes = outcomes.into_iter();
        for op in batch.drain(..) {
            match (op, outcomes.next()) {
                (Op::Append { reply, .. }, Some(Outcome::Appended(r))) => {
                    let _ = reply.send(r);
                }
                (Op::Ack { reply, .. }, Some(Outcome::Acked(a))) => {
                    let _ = reply.send(Ok(a));
                }
                (Op::Transact { reply, .. }, Some(Outcome::Done)) => {
                    let _ = reply.send(Ok(()));
                }
                _ => {}
            }
        }
    }

    /// A write transaction on the open store (none while it is being reopened).
    fn begin_write(&self) -> Result<redb::WriteTransaction, redb::Error> {
        let db = self
            .shared
            .db
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        match db.as_ref() {
            Some(db) => Ok(db.begin_write()?),
            None => Err(redb::Error::DatabaseClosed),
        }
    }

    /// Whether this batch can be a journal record plus a non-durable redb commit rather
    /// than a checkpoint: small, no caller transaction (the desired state's tables are
    /// written durably), and the journal neither full nor due for a checkpoint.
    fn journal_fits(&self, batch: &[Op], appends: usize) -> bool {
        let Some(journal) = &self.journal else {
            return false;
        };
        // Past half the journal, the next commit of acknowledgements alone is the
        // checkpoint: the queue is short then, so it writes few pages. Appends go on into the
        // journal while they fit (a checkpoint with them would write their pages).
        appends < JOURNAL_MAX_CHANGES
            && journal.records < JOURNAL_RECORDS_MAX
            && journal.changes + appends as u64 <= JOURNAL_CHANGES_MAX
            && (appends > 0 || journal.used() < journal::CAPACITY / 2)
            && batch.iter().all(|op| match op {
                Op::Append { changes, .. } => {
                    changes.iter().all(|c| c.value.len() <= JOURNAL_VALUE_MAX)
                }
                Op::Ack { .. } | Op::ShadowMark { .. } => true,
                _ => false,
            })
    }

    /// Applies a batch in one write transaction; one outcome per non-shutdown op, in order.
    /// Returns whether what it did is durable now (a checkpoint, or a synced journal record):
    /// only then is its seq reservation on disk.
    fn apply(&mut self, batch: &[Op]) -> Result<(Vec<Outcome>, bool), redb::Error> {
        let mut txn = self.begin_write()?;
        let sink = lock(&self.shared.tail)
            .as_ref()
            .filter(|t| !t.is_closed())
            .cloned();
        self.tail_buf.clear();
        // A commit too large to hand over is a backlog: do not copy its records at all (the
        // bound is checked again per record, for appends made inside `transact`).
        let appends: usize = batch
            .iter()
            .map(|op| match op {
                Op::Append { changes, .. } => changes.len(),
                _ => 0,
            })
            .sum();
        let mut light = self.journal_fits(batch, appends);
        self.collect_tail = sink.is_some() && appends <= TAIL_MAX;
        self.pending_rows.clear();
        self.pending_last.clear();
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut record = journal::Record::default();
        let mut acked = 0u64;
        let light_write;
        {
            let mut outbox = Queue::open(&txn, self.classes.as_ref().map(|c| c.count()))?;
            let mut reported = txn.open_table(REPORTED)?;
            // Latest value per key in this batch: one `reported` write per key.
            let mut latest: HashMap<&str, Latest<&[u8]>> = HashMap::new();
            let mut owned: HashMap<String, Latest<Vec<u8>>> = HashMap::new();
            for op in batch {
                match op {
                    Op::Append { changes, .. } => {
                        let mut records = Vec::new();
                        let r =
                            self.append(&mut outbox, &reported, changes, |c, seq, ts, rec| {
                                latest.insert(
                                    &c.key,
                                    Latest {
                                        seq,
                                        ts,
                                        value: &c.value,
                                        origin: c.origin.tag(),
                                    },
                                );
                                // The journal keeps the record as the outbox got it.
                                if light {
                                    records.push(rec.to_vec());
                                }
                            })?;
                        if light {
                            record.entries.push(match &r {
                                Ok(a) => journal::Entry::Append {
                                    first_seq: a.first_seq,
                                    records,
                                },
                                Err(_) => journal::Entry::Rejected(changes.len() as u64),
                            });
                        }
                        outcomes.push(Outcome::Appended(r));
                    }
                    Op::Ack { ack, .. } => {
                        let a = self.ack(&mut outbox, ack)?;
                        acked += a.changes;
                        if light {
                            record.entries.push(journal::Entry::Ack(ack.clone()));
                        }
                        outcomes.push(Outcome::Acked(a));
                    }
                    Op::Transact { f, .. } => {
                        let f = f.lock().unwrap_or_else(PoisonError::into_inner).take();
                        if let Some(f) = f {
                            let mut ctx = TxnCtx {
                                txn: &txn,
                                outbox: &mut outbox,
                                reported: &reported,
                                writer: self,
                                latest: &mut owned,
                            };
                            f(&mut ctx)?;
                        }
                        outcomes.push(Outcome::Done);
                    }
                    Op::ShadowMark { shadow, seq } => {
                        let mut t = txn.open_table(tables::SHADOW)?;
                        let old = t.get(shadow.as_str())?.map_or(0, |v| v.value());
                        if *seq > old {
                            t.insert(shadow.as_str(), *seq)?;
                        }
                        outcomes.push(Outcome::Done);
                    }
                    Op::Heartbeat { .. } | Op::Shutdown => {}
                }
            }
            if acked > 0 {
                outbox.trim(self.meta.next_seq)?;
            }
            // As early as possible: the rest of the transaction only adds the latest values
            // and the counters, and a failure from here on is handled like a failed commit.
            if let Some(sink) = &sink {
                self.hand_over_tail(sink);
            }
            self.write_latest(&mut reported, &latest, &owned)?;
            // Reserve seqs ahead only while someone takes records early; release otherwise.
            self.meta.seq_reserved = match sink {
                Some(_) => self.meta.next_seq + SEQ_RESERVE,
                None => self.meta.next_seq,
            };
            // Bytes written ride along (issue 16): never a commit of their own.
            self.meta.written_bytes = self.shared.written_lifetime();
            record.seq_reserved = self.meta.seq_reserved;
            // A record is written when it holds appends (they are answered once durable)
            // or enough acknowledgements wait; otherwise they wait in memory.
            let write = appends > 0
                || self
                    .journal
                    .as_ref()
                    .is_some_and(|j| j.pending_acks + acked >= ACK_SYNC);
            if light && write {
                light = self.journal.as_mut().is_some_and(|j| j.prepare(&record));
            }
            if !light {
                self.meta.wal_epoch += 1;
                self.meta.wal_records = 0;
            } else if write {
                self.meta.wal_records += 1;
            }
            let mut meta = txn.open_table(META)?;
            self.meta.store(&mut meta)?;
            light_write = (light, write);
        }
        let (light, write) = light_write;
        let mut durable = !light;
        match (&mut self.journal, light) {
            (Some(journal), true) => {
                txn.set_durability(Durability::None)?;
                if write {
                    // The record first: if it cannot be written, nothing happened.
                    journal.write().map_err(redb::Error::Io)?;
                    durable = true;
                } else {
                    journal.defer(std::mem::take(&mut record.entries), acked);
                }
            }
            _ => txn.set_durability(Durability::Immediate)?,
        }
        txn.commit()?;
        if !light && let Some(journal) = &mut self.journal {
            journal.restart(self.meta.wal_epoch);
        }
        Ok((outcomes, durable))
    }

    /// Writes this transaction's latest value of each key to `reported`; where both plain
    /// appends and a caller's transaction touched a key, the higher seq is the newer.
    fn write_latest(
        &mut self,
        reported: &mut redb::Table<&'static str, (u64, &'static [u8])>,
        latest: &HashMap<&str, Latest<&[u8]>>,
        owned: &HashMap<String, Latest<Vec<u8>>>,
    ) -> Result<(), redb::Error> {
        let newer_owned = |key: &str, seq: u64| owned.get(key).is_some_and(|o| o.seq > seq);
        for (key, l) in latest {
            if newer_owned(key, l.seq) {
                continue;
            }
            record::encode_with_origin(&mut self.buf, l.ts, key, l.value, l.origin);
            reported.insert(*key, (l.seq, self.buf.as_slice()))?;
        }
        for (key, l) in owned {
            if latest.get(key.as_str()).is_some_and(|b| b.seq > l.seq) {
                continue;
            }
            record::encode_with_origin(&mut self.buf, l.ts, key, &l.value, l.origin);
            reported.insert(key.as_str(), (l.seq, self.buf.as_slice()))?;
        }
        Ok(())
    }

    /// Applies the journal's records (the commits since the last checkpoint) again, in
    /// order, to the state redb holds, in one checkpoint. What was acknowledged is not
    /// refused again, whatever the bounds say now.
    fn replay(&mut self, records: Vec<journal::Record>) -> Result<(), redb::Error> {
        // Only records past those this state includes; none: no write at open.
        if records.len() as u64 <= self.meta.wal_records {
            return Ok(());
        }
        let (n_records, mut changes, mut acks) = (records.len(), 0usize, 0u64);
        let txn = self.begin_write()?;
        self.collect_tail = false;
        self.pending_rows.clear();
        self.pending_last.clear();
        self.replaying = true;
        let result = (|| -> Result<(), redb::Error> {
            let mut outbox = Queue::open(&txn, self.classes.as_ref().map(|c| c.count()))?;
            let mut reported = txn.open_table(REPORTED)?;
            let mut owned: HashMap<String, Latest<Vec<u8>>> = HashMap::new();
            let done = usize::try_from(self.meta.wal_records).unwrap_or(usize::MAX);
            for rec in records.into_iter().skip(done) {
                for entry in rec.entries {
                    match entry {
                        journal::Entry::Append { first_seq, records } => {
                            let mut batch = Vec::with_capacity(records.len());
                            for r in &records {
                                let r = record::decode(r).map_err(|e| {
                                    redb::Error::Corrupted(format!("journal record: {e}"))
                                })?;
                                batch.push(NewChange {
                                    key: r.key.to_owned(),
                                    value: r.value.to_vec(),
                                    ts: Some(r.ts),
                                    origin: crate::model::change::Origin::from_tag(r.origin),
                                });
                            }
                            // The seqs it was given, whatever a reservation moved since.
                            self.meta.next_seq = first_seq;
                            let last = outbox.outbox.last()?.map(|(k, _)| k.value());
                            if last.is_some_and(|l| l >= first_seq) {
                                return Err(redb::Error::Corrupted(format!(
                                    "journal record for seq {first_seq} behind the queue"
                                )));
                            }
                            changes += batch.len();
                            let _ =
                                self.append(&mut outbox, &reported, &batch, |c, seq, ts, _| {
                                    Latest::keep(&mut owned, c, seq, ts);
                                })?;
                        }
                        journal::Entry::Rejected(n) => self.meta.rejected += n,
                        journal::Entry::Ack(a) => acks += self.ack(&mut outbox, &a)?.changes,
                    }
                }
                self.meta.seq_reserved = self.meta.seq_reserved.max(rec.seq_reserved);
            }
            if acks > 0 {
                outbox.trim(self.meta.next_seq)?;
            }
            self.write_latest(&mut reported, &HashMap::new(), &owned)?;
            // Seqs up to the reservation may be at the broker: continue after them.
            self.meta.next_seq = self.meta.next_seq.max(self.meta.seq_reserved);
            self.meta.seq_reserved = self.meta.next_seq;
            self.meta.wal_epoch += 1;
            self.meta.wal_records = 0;
            let mut meta = txn.open_table(META)?;
            self.meta.store(&mut meta)?;
            Ok(())
        })();
        self.replaying = false;
        result?;
        txn.commit()?;
        if let Some(journal) = &mut self.journal {
            journal.restart(self.meta.wal_epoch);
        }
        self.durable_reserved = self.meta.seq_reserved;
        tracing::info!(
            records = n_records,
            changes,
            acked = acks,
            next_seq = self.meta.next_seq,
            "replayed the store journal (the commits since the last checkpoint)"
        );
        Ok(())
    }

    /// Hands this commit's new records to the sync engine before the fsync, if every seq is
    /// covered by a reservation already on disk.
    fn hand_over_tail(&mut self, sink: &mpsc::Sender<Vec<Queued>>) {
        let covered = self
            .tail_buf
            .last()
            .is_some_and(|q| q.seq < self.durable_reserved);
        if self.collect_tail && covered {
            // Full (the receiver is behind): not handed over; it reads them from the store.
            if sink.try_send(std::mem::take(&mut self.tail_buf)).is_ok() {
                self.tail_sent = true;
            }
        }
        self.tail_buf.clear();
    }

    /// The accounted cost of `key`'s `reported` row as of this point of the transaction.
    fn reported_cost_of(
        &self,
        reported: &redb::Table<&'static str, (u64, &'static [u8])>,
        key: &str,
    ) -> Result<u64, redb::Error> {
        if let Some(c) = self.pending_rows.get(key) {
            return Ok(*c);
        }
        Ok(reported
            .get(key)?
            .map_or(0, |v| reported_row_cost(key, v.value().1.len())))
    }

    /// Evicts queued changes (counted in `dropped`) until `bytes <= room`: in the order of
    /// the retention classes with `[[store.class]]` ([`class`]), else oldest first.
    fn evict_to(&mut self, q: &mut Queue<'_>, room: u64) -> Result<(), redb::Error> {
        self.evict_within(q, room, Allow::All)
    }

    fn evict_within(
        &mut self,
        q: &mut Queue<'_>,
        room: u64,
        allow: Allow,
    ) -> Result<(), redb::Error> {
        if self.meta.bytes <= room {
            return Ok(());
        }
        if let Some(classes) = self.classes.clone() {
            let need = self.meta.bytes - room;
            let counters = &mut self.class_counters;
            let (n, bytes) = class::evict(q, &classes, now_ms(), need, allow, counters)?;
            self.meta.bytes = self.meta.bytes.saturating_sub(bytes);
            self.meta.depth = self.meta.depth.saturating_sub(n);
            self.meta.dropped += n;
            if allow == Allow::ExpiredOnly {
                return Ok(());
            }
        }
        // Without classes; with them only on an index drift (their entries then go stale).
        while self.meta.bytes > room {
            let Some((_, v)) = q.outbox.pop_first()? else {
                // Accounting drift: nothing left to evict.
                self.meta.bytes = 0;
                self.meta.depth = 0;
                break;
            };
            self.meta.bytes = self.meta.bytes.saturating_sub(cost(v.value().len()));
            self.meta.depth = self.meta.depth.saturating_sub(1);
            self.meta.dropped += 1;
        }
        Ok(())
    }

    /// A key's last queued change as this transaction leaves it: `(seq, ts, value)` (the
    /// value only when `value`).
    fn last_of(
        &self,
        reported: &redb::Table<&'static str, (u64, &'static [u8])>,
        key: &str,
        value: bool,
    ) -> Result<Option<(u64, u64, Vec<u8>)>, redb::Error> {
        if let Some((seq, ts, v)) = self.pending_last.get(key) {
            return Ok(Some((*seq, *ts, v.clone())));
        }
        let Some(row) = reported.get(key)? else {
            return Ok(None);
        };
        let (seq, rec) = row.value();
        // An undecodable row: as if there were none (the change is queued).
        Ok(record::decode(rec)
            .ok()
            .map(|r| (seq, r.ts, if value { r.value.to_vec() } else { Vec::new() })))
    }

    /// Each change's class, intake verdict (deadband, dedupe, heartbeat against its key's
    /// last queued value, and the changes of this request before it) and the seq of its
    /// key's last queued change before this request.
    fn classify(
        &self,
        classes: &Classes,
        reported: &redb::Table<&'static str, (u64, &'static [u8])>,
        changes: &[NewChange],
        now: u64,
    ) -> Result<Vec<(ClassId, Intake, Option<u64>)>, redb::Error> {
        let mut here: HashMap<&str, (u64, &[u8])> = HashMap::new();
        let mut out = Vec::with_capacity(changes.len());
        for c in changes {
            let class = classes.class_of(&c.key);
            let filters = classes.filters(class) && !self.replaying;
            let last = self.last_of(reported, &c.key, filters)?;
            let ts = c.ts.unwrap_or(now);
            let intake = if filters {
                let before = here.get(c.key.as_str()).copied();
                let before = before.or(last.as_ref().map(|(_, t, v)| (*t, v.as_slice())));
                let l = before.map(|(ts, value)| Last { ts, value });
                classes.intake(class, l, &c.value, ts)
            } else {
                Intake::Queue
            };
            if intake.queued() {
                here.insert(&c.key, (ts, &c.value));
            }
            out.push((class, intake, last.map(|l| l.0)));
        }
        Ok(out)
    }

    fn append<'b>(
        &mut self,
        q: &mut Queue<'_>,
        reported: &redb::Table<&'static str, (u64, &'static [u8])>,
        changes: &'b [NewChange],
        mut inserted: impl FnMut(&'b NewChange, u64, u64, &[u8]),
    ) -> Result<Result<Appended, StoreError>, redb::Error> {
        let now = now_ms();
        let classes = self.classes.clone();
        let verdicts = match &classes {
            Some(cl) => self.classify(cl, reported, changes, now)?,
            None => Vec::new(),
        };
        let kept = |i: usize| verdicts.get(i).is_none_or(|v| v.1.queued());
        let n = (0..changes.len()).filter(|&i| kept(i)).count() as u64;
        let filtered = changes.len() as u64 - n;
        let count_verdicts = |counters: &mut Vec<ClassCounters>| {
            for (class, intake, _) in &verdicts {
                if let Some(c) = counters.get_mut(usize::from(*class)) {
                    intake.count(c);
                }
            }
        };
        if n == 0 {
            count_verdicts(&mut self.class_counters);
            let seq = self.meta.next_seq;
            return Ok(Ok(Appended {
                first_seq: seq,
                last_seq: seq.saturating_sub(1),
                filtered,
            }));
        }
        let refused = changes.len() as u64;
        let queued = || changes.iter().enumerate().filter(|(i, _)| kept(*i));
        let needed: u64 = queued()
            .map(|(_, c)| cost(record::encoded_len(&c.key, &c.value)))
            .sum();
        // The latest-value rows as this request leaves them (the last change of a key wins).
        let mut rows: HashMap<&str, u64> = HashMap::new();
        let (mut added, mut removed) = (0u64, 0u64);
        for (_, c) in queued() {
            let len = record::exact_len(c.ts.unwrap_or(now), &c.key, c.value.len(), c.origin.tag());
            let new = reported_row_cost(&c.key, len);
            let old = match rows.get(c.key.as_str()) {
                Some(old) => *old,
                None => self.reported_cost_of(reported, &c.key)?,
            };
            rows.insert(&c.key, new);
            added += new;
            removed += old;
        }
        let state = self.meta.state_bytes + added;
        let state = state.saturating_sub(removed);
        let allowance = state_allowance(self.max_bytes);
        if state > allowance && state > self.meta.state_bytes && !self.replaying {
            self.meta.rejected += refused;
            return Ok(Err(StoreError::StateFull {
                needed: state - self.meta.state_bytes,
                used: self.meta.state_bytes,
                max: allowance,
            }));
        }
        // The queue takes what the state leaves.
        let room = self.max_bytes.saturating_sub(state);
        let full = StoreError::Full {
            needed,
            queued: self.meta.bytes,
            max: self.max_bytes,
            state: self.meta.state_bytes,
        };
        if needed > room && !self.replaying {
            self.meta.rejected += refused;
            return Ok(Err(full));
        }
        if self.meta.bytes + needed > room {
            match self.when_full {
                // Replaying: acknowledged once, so taken over the bound.
                WhenFull::Reject if self.replaying => {}
                WhenFull::Reject => {
                    // With classes, expired changes make room first: a ttl says they are
                    // worth nothing now.
                    if classes.is_some() {
                        let to = room.saturating_sub(needed);
                        self.evict_within(q, to, Allow::ExpiredOnly)?;
                    }
                    if self.meta.bytes + needed > room {
                        self.meta.rejected += refused;
                        return Ok(Err(full));
                    }
                }
                WhenFull::DropOldest => self.evict_to(q, room.saturating_sub(needed))?,
            }
        }
        self.meta.state_bytes = state;
        for (key, c) in rows {
            self.pending_rows.insert(key.to_owned(), c);
        }
        let keep_values = classes.as_ref().is_some_and(|c| c.any_filter());
        let mut here: HashMap<&str, u64> = HashMap::new();
        let first_seq = self.meta.next_seq;
        for (i, c) in queued() {
            let seq = self.meta.next_seq;
            let ts = c.ts.unwrap_or(now);
            record::encode_with_origin(&mut self.buf, ts, &c.key, &c.value, c.origin.tag());
            q.outbox.insert(seq, self.buf.as_slice())?;
            if let Some(&(class, _, before)) = verdicts.get(i) {
                let prev = here.insert(&c.key, seq).or(before);
                q.index(class, seq, ts, prev)?;
                let value = if keep_values {
                    c.value.clone()
                } else {
                    Vec::new()
                };
                self.pending_last.insert(c.key.clone(), (seq, ts, value));
            }
            if self.collect_tail {
                if self.tail_buf.len() < TAIL_MAX {
                    self.tail_buf.push(Queued {
                        seq,
                        record: self.buf.clone(),
                    });
                } else {
                    self.collect_tail = false;
                    self.tail_buf.clear();
                }
            }
            self.meta.next_seq += 1;
            self.meta.depth += 1;
            self.meta.bytes += cost(self.buf.len());
            inserted(c, seq, ts, &self.buf);
        }
        count_verdicts(&mut self.class_counters);
        self.meta.reported += n;
        Ok(Ok(Appended {
            first_seq,
            last_seq: self.meta.next_seq - 1,
            filtered,
        }))
    }

    /// Every queued change removed, counted as dropped (see [`TxnCtx::purge`]).
    fn purge(&mut self, q: &mut Queue<'_>) -> Result<Acked, redb::Error> {
        let mut gone = Acked::default();
        for item in q.outbox.extract_from_if(..=u64::MAX, |_, _| true)? {
            let (_, v) = item?;
            gone.changes += 1;
            gone.bytes += cost(v.value().len());
        }
        q.clear_index()?;
        self.meta.depth = self.meta.depth.saturating_sub(gone.changes);
        self.meta.bytes = self.meta.bytes.saturating_sub(gone.bytes);
        self.meta.dropped += gone.changes;
        Ok(gone)
    }

    fn ack(&mut self, q: &mut Queue<'_>, ack: &Ack) -> Result<Acked, redb::Error> {
        let mut acked = Acked::default();
        if let Ack::RangeSkipping {
            first,
            last,
            corrupt,
        } = ack
        {
            let bad = self.ack(q, &Ack::Corrupt(corrupt.clone()))?;
            let good = self.ack(
                q,
                &Ack::Range {
                    first: *first,
                    last: *last,
                },
            )?;
            return Ok(Acked {
                changes: bad.changes + good.changes,
                bytes: bad.bytes + good.bytes,
            });
        }
        let outbox = &mut q.outbox;
        if let Ack::Corrupt(seqs) = ack {
            for seq in seqs {
                if let Some(v) = outbox.remove(*seq)? {
                    acked.changes += 1;
                    acked.bytes += cost(v.value().len());
                }
            }
            self.meta.depth = self.meta.depth.saturating_sub(acked.changes);
            self.meta.bytes = self.meta.bytes.saturating_sub(acked.bytes);
            self.meta.corrupt += acked.changes;
            return Ok(acked);
        }
        let mut count = |len: usize| {
            acked.changes += 1;
            acked.bytes += cost(len);
        };
        // Ranges go through `retain_in`, which rewrites each leaf once for all its removed
        // entries; `extract_from_if` removes (and re-seeks) entry by entry, which cost a
        // memmove of the rest of the leaf per change and about a third of the agent's CPU
        // in a backlog drain (benches/sync.rs).
        match ack {
            Ack::Through(last) => outbox.retain_in(..=*last, |_, v| {
                count(v.len());
                false
            })?,
            Ack::Range { first, last } | Ack::RangeSkipping { first, last, .. } => outbox
                .retain_in(*first..=*last, |_, v| {
                    count(v.len());
                    false
                })?,
            Ack::Seqs(seqs) | Ack::Corrupt(seqs) => {
                for seq in seqs {
                    if let Some(v) = outbox.remove(*seq)? {
                        count(v.value().len());
                    }
                }
            }
        }
        self.meta.depth = self.meta.depth.saturating_sub(acked.changes);
        self.meta.bytes = self.meta.bytes.saturating_sub(acked.bytes);
        self.meta.acked += acked.changes;
        Ok(acked)
    }
}

/// The outbox table and, with retention classes, its indexes ([`tables::CLASS_QUEUE`],
/// [`tables::SUPERSEDED`]), in one write transaction. Index entries are written with the
/// change; acks leave them behind ("stale"), dropped by [`Queue::trim`] below the first
/// queued seq and by eviction as it meets them.
struct Queue<'t> {
    outbox: redb::Table<'t, u64, &'static [u8]>,
    idx: Option<Index<'t>>,
    /// The first queued seq as of the first time this transaction needed it: a lower bound.
    first: Option<u64>,
}

struct Index<'t> {
    by_class: redb::Table<'t, u64, u64>,
    superseded: redb::Table<'t, u64, u64>,
    classes: u8,
}

impl<'t> Queue<'t> {
    fn open(txn: &'t redb::WriteTransaction, classes: Option<usize>) -> Result<Self, redb::Error> {
        let idx = match classes {
            Some(n) => Some(Index {
                by_class: txn.open_table(CLASS_QUEUE)?,
                superseded: txn.open_table(SUPERSEDED)?,
                classes: u8::try_from(n).unwrap_or(u8::MAX),
            }),
            None => None,
        };
        Ok(Queue {
            outbox: txn.open_table(OUTBOX)?,
            idx,
            first: None,
        })
    }

    /// Indexes change `seq` of `class`; `prev`, its key's previous queued change, is
    /// superseded now (unless below the first queued seq: acknowledged or evicted already).
    fn index(
        &mut self,
        class: ClassId,
        seq: u64,
        ts: u64,
        prev: Option<u64>,
    ) -> Result<(), redb::Error> {
        let first = match (prev, self.first) {
            (None, _) => 0,
            (Some(_), Some(f)) => f,
            (Some(_), None) => {
                let f = self.outbox.first()?.map_or(seq, |(k, _)| k.value());
                *self.first.insert(f)
            }
        };
        let Some(ix) = &mut self.idx else {
            return Ok(());
        };
        ix.by_class.insert(class_key(class, seq), ts)?;
        if let Some(p) = prev.filter(|p| *p >= first) {
            ix.superseded.insert(p, u64::from(class))?;
        }
        Ok(())
    }

    /// After acks: index entries below the first queued seq go (amortised: once each).
    fn trim(&mut self, next_seq: u64) -> Result<(), redb::Error> {
        let Some(ix) = &mut self.idx else {
            return Ok(());
        };
        let first = self.outbox.first()?.map_or(next_seq, |(k, _)| k.value());
        for c in 0..ix.classes {
            ix.by_class
                .retain_in(class_key(c, 0)..class_key(c, first), |_, _| false)?;
        }
        ix.superseded.retain_in(..first, |_, _| false)?;
        Ok(())
    }

    fn clear_index(&mut self) -> Result<(), redb::Error> {
        if let Some(ix) = &mut self.idx {
            ix.by_class.retain(|_, _| false)?;
            ix.superseded.retain(|_, _| false)?;
        }
        Ok(())
    }
}

impl EvictQueue for Queue<'_> {
    type Error = redb::Error;

    fn class_first(&mut self, c: ClassId) -> Result<Option<(u64, u64)>, redb::Error> {
        let Some(ix) = &self.idx else {
            return Ok(None);
        };
        let mut range = ix
            .by_class
            .range(class_key(c, 0)..=class_key(c, u64::MAX))?;
        match range.next() {
            Some(e) => {
                let (k, v) = e?;
                Ok(Some((class_key_seq(k.value()), v.value())))
            }
            None => Ok(None),
        }
    }

    fn superseded_first(&mut self) -> Result<Option<(u64, ClassId)>, redb::Error> {
        let Some(ix) = &self.idx else {
            return Ok(None);
        };
        let first = ix.superseded.first()?;
        Ok(first.map(|(k, v)| (k.value(), u8::try_from(v.value()).unwrap_or(u8::MAX))))
    }

    fn remove(&mut self, seq: u64, c: ClassId) -> Result<Option<u64>, redb::Error> {
        let bytes = self.outbox.remove(seq)?.map(|v| cost(v.value().len()));
        if let Some(ix) = &mut self.idx {
            ix.by_class.remove(class_key(c, seq))?;
            ix.superseded.remove(seq)?;
        }
        Ok(bytes)
    }
}

/// The `meta` row naming the class layout the class index was made for.
const CLASS_LAYOUT: &str = "class_layout";

/// Makes the class index match `classes` at open: nothing to do when the layout is the one
/// it was made for (no write); else rebuilt from the queue in one durable commit (once per
/// change of the globs: O(queue)), or dropped when classes were removed.
fn sync_class_index(db: &Database, classes: Option<&Classes>) -> Result<(), redb::Error> {
    let want = classes.map_or(0, Classes::layout);
    let have = {
        let txn = db.begin_read()?;
        let meta = txn.open_table(META)?;
        meta.get(CLASS_LAYOUT)?.map_or(0, |v| v.value())
    };
    if have == want {
        return Ok(());
    }
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    let mut indexed = 0u64;
    txn.delete_table(CLASS_QUEUE)?;
    txn.delete_table(SUPERSEDED)?;
    {
        let mut meta = txn.open_table(META)?;
        match classes {
            Some(classes) => {
                let outbox = txn.open_table(OUTBOX)?;
                let reported = txn.open_table(REPORTED)?;
                let mut by_class = txn.open_table(CLASS_QUEUE)?;
                let mut superseded = txn.open_table(SUPERSEDED)?;
                for item in outbox.iter()? {
                    let (k, v) = item?;
                    let seq = k.value();
                    // A damaged record is indexed in the default class.
                    let (class, ts, newest) = match record::decode(v.value()) {
                        Ok(r) => {
                            let latest = reported.get(r.key)?.map(|l| l.value().0);
                            (
                                classes.class_of(r.key),
                                r.ts,
                                latest.is_none_or(|l| l == seq),
                            )
                        }
                        Err(_) => ((classes.count() - 1) as ClassId, 0, true),
                    };
                    by_class.insert(class_key(class, seq), ts)?;
                    if !newest {
                        superseded.insert(seq, u64::from(class))?;
                    }
                    indexed += 1;
                }
                meta.insert(CLASS_LAYOUT, want)?;
            }
            None => {
                meta.remove(CLASS_LAYOUT)?;
            }
        }
    }
    txn.commit()?;
    tracing::info!(
        queued = indexed,
        "retention classes changed: the store's class index was rebuilt"
    );
    Ok(())
}

impl Outbox {
    /// Per retention class: name, priority and counters since start (empty without
    /// `[[store.class]]`).
    pub fn class_stats(&self) -> Vec<ClassStats> {
        lock(&self.shared.class_stats).clone()
    }
}

fn op_changes(op: &Op) -> usize {
    match op {
        Op::Append { changes, .. } => changes.len().max(1),
        Op::Ack { .. }
        | Op::Transact { .. }
        | Op::ShadowMark { .. }
        | Op::Heartbeat { .. }
        | Op::Shutdown => 1,
    }
}

/// A 1 MiB store in `dir` that refuses when full, for the unit tests of the modules that
/// keep tables in it.
#[cfg(test)]
pub(crate) fn test_outbox(dir: &std::path::Path) -> Outbox {
    #[allow(clippy::unwrap_used)]
    Outbox::open(&StoreOptions {
        path: dir.join("s.redb"),
        max_bytes: 1 << 20,
        when_full: WhenFull::Reject,
        cache_size: 1 << 20,
    })
    .unwrap()
}

#[cfg(test)]
mod tests;
