//! The sync engine, sans-IO: decides what to read from the outbox, how to pack it into
//! batches, when to publish and what to delete, from events and the current time only.
//! The driver ([`super::run`]) performs the [`Action`]s it asks for and reports back.
//!
//! # Rules
//! - **Order.** Changes are read and published in seq order. Batches hold consecutive queued
//!   changes, so a batch's `[first_seq, last_seq]` range covers exactly its changes among
//!   what is queued (seqs are never reused).
//! - **No idle delay.** With `linger = 0` a change is published as soon as the window has
//!   room. Under load the window fills, changes queue, and the next read returns many:
//!   batches grow by themselves.
//! - **Window.** At most `max_inflight` batches await their PUBACK.
//! - **Ack before delete.** A batch's changes are deleted (an [`Action::Ack`] of its range)
//!   only after its PUBACK.
//! - **The outbox is the only truth.** On every (re)connect all in-flight and buffered state
//!   is forgotten and reading restarts at the oldest queued change, after the deletes still
//!   in progress have finished (so acknowledged changes are not sent again).
//! - **Epochs.** Reads answered after a disconnect belong to an old connection and are
//!   ignored.
//! - **Tail before the fsync.** The store hands over each commit's new records just before
//!   its fsync ([`crate::store::Outbox::tail`]). When the engine is caught up (online, no
//!   read outstanding, nothing buffered, and the records start exactly at the cursor), it
//!   takes them as if read, so an online change is published while the disk syncs.
//!   Otherwise they are ignored and read from the store after the commit, as always.
//! - **Shrink on a link that never gets a batch through.** After [`SHRINK_AFTER`]
//!   connections in a row that ended with a batch in flight and no PUBACK at all, the batch
//!   limits (changes and bytes) are halved, down to one change; they are restored once the
//!   queue is caught up again. A link that drops every connection after a few kilobytes
//!   then still progresses, a batch at a time.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::{Compression, Encoding};
use crate::link::codec::{Batch, BatchBuilder};
use crate::store::{Ack, Queued};

/// Connections in a row that end with a batch in flight and no PUBACK before the batch
/// limits are halved.
pub const SHRINK_AFTER: u32 = 3;

/// Engine settings (from `[sync]`).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub device: String,
    pub encoding: Encoding,
    pub batch_max_changes: usize,
    pub batch_max_bytes: usize,
    pub max_inflight: usize,
    pub linger: Duration,
    pub compression: Compression,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Read up to `max_changes` queued changes with `seq >= from`; answer with
    /// [`Engine::handle_read`] and the same `epoch`.
    Read {
        epoch: u64,
        from: u64,
        max_changes: usize,
        max_bytes: usize,
    },
    /// Publish this batch at QoS 1; report its PUBACK with [`Engine::handle_puback`].
    Publish { id: u64, batch: Batch },
    /// Delete these changes; report completion with [`Engine::handle_ack_done`].
    Ack { ack: Ack },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Inflight {
    id: u64,
    first_seq: u64,
    last_seq: u64,
    changes: u64,
    /// Damaged records skipped while this batch was built: removed after its PUBACK.
    corrupt: Vec<u64>,
}

/// Counters the engine keeps (for status).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Changes published for the first time.
    pub sent: u64,
    /// Changes published again (after a reconnect).
    pub resent: u64,
    pub batches: u64,
    pub acked_batches: u64,
    /// Unreadable records skipped (and deleted).
    pub skipped: u64,
}

#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    online: bool,
    epoch: u64,
    /// Next seq to read.
    cursor: u64,
    reading: bool,
    /// `next_seq` of the store as last seen: seqs below it may be queued.
    store_next: u64,
    /// `store_next` when the outstanding read was issued.
    read_upto: u64,
    /// Read, not yet batched.
    buffer: VecDeque<Queued>,
    /// When the buffer last went from empty to non-empty (for `linger`).
    buffer_since: Option<Instant>,
    inflight: VecDeque<Inflight>,
    next_id: u64,
    /// Deletes issued and not yet committed.
    acks_pending: usize,
    highest_sent: u64,
    builder: BatchBuilder,
    actions: VecDeque<Action>,
    stats: EngineStats,
    /// No new batches (a reload waits for the window to empty).
    paused: bool,
    /// A PUBACK came on this connection.
    acked_this_connection: bool,
    /// Connections in a row that ended with a batch in flight and no PUBACK.
    failed_connections: u32,
    /// How many times the batch limits are halved.
    shrink: u32,
}

impl Engine {
    pub fn new(cfg: EngineConfig, store_next: u64) -> Self {
        let builder = BatchBuilder::new(
            cfg.encoding,
            &cfg.device,
            cfg.batch_max_changes,
            cfg.batch_max_bytes,
        )
        .with_compression(cfg.compression);
        Self {
            cfg,
            online: false,
            epoch: 0,
            cursor: 0,
            reading: false,
            store_next,
            read_upto: 0,
            buffer: VecDeque::new(),
            buffer_since: None,
            inflight: VecDeque::new(),
            next_id: 1,
            acks_pending: 0,
            highest_sent: 0,
            builder,
            actions: VecDeque::new(),
            stats: EngineStats::default(),
            paused: false,
            acked_this_connection: false,
            failed_connections: 0,
            shrink: 0,
        }
    }

    /// New settings (a reload); they apply to the next batch.
    pub fn reconfigure(&mut self, cfg: EngineConfig) {
        self.cfg = cfg;
        self.builder = self.new_builder();
    }

    /// The batch limits now: the configured ones, halved `shrink` times (at least one
    /// change).
    pub fn batch_limits(&self) -> (usize, usize) {
        let s = self.shrink.min(usize::BITS - 1);
        (
            (self.cfg.batch_max_changes >> s).max(1),
            (self.cfg.batch_max_bytes >> s).max(1),
        )
    }

    fn new_builder(&self) -> BatchBuilder {
        let (changes, bytes) = self.batch_limits();
        BatchBuilder::new(self.cfg.encoding, &self.cfg.device, changes, bytes)
            .with_compression(self.cfg.compression)
    }

    /// Publishes nothing new until the next connection; PUBACKs are still handled.
    pub fn pause(&mut self) {
        self.paused = true;
    }

    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    /// Batches awaiting their PUBACK.
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// True when nothing is queued beyond what the broker acknowledged and deletes finished.
    #[cfg(test)]
    pub fn is_drained(&self) -> bool {
        self.inflight.is_empty()
            && self.buffer.is_empty()
            && !self.reading
            && self.acks_pending == 0
            && self.cursor >= self.store_next
    }

    /// The link is up (after CONNACK): start again from the oldest queued change.
    pub fn handle_connected(&mut self, now: Instant) {
        self.reset();
        self.online = true;
        self.pump(now);
    }

    /// The link went down: forget everything in flight; it stays queued.
    pub fn handle_disconnected(&mut self) {
        if self.online && !self.inflight.is_empty() && !self.acked_this_connection {
            self.failed_connections += 1;
            if self.failed_connections >= SHRINK_AFTER && self.batch_limits().0 > 1 {
                self.failed_connections = 0;
                self.shrink += 1;
                let (changes, bytes) = self.batch_limits();
                tracing::warn!(
                    "{SHRINK_AFTER} connections in a row ended before a batch was acknowledged: \
                     batches now at most {changes} changes / {bytes} bytes until the queue is caught up"
                );
            }
        }
        self.reset();
        self.online = false;
    }

    /// The queue is caught up: back to the configured batch limits.
    fn maybe_restore(&mut self) {
        let caught_up = self.inflight.is_empty()
            && self.buffer.is_empty()
            && !self.reading
            && self.cursor >= self.store_next;
        if self.shrink > 0 && caught_up {
            self.shrink = 0;
            self.builder = self.new_builder();
            tracing::info!("queue caught up: batches back to their configured limits");
        }
    }

    fn reset(&mut self) {
        self.acked_this_connection = false;
        self.paused = false;
        self.epoch += 1;
        self.cursor = 0;
        self.reading = false;
        self.buffer.clear();
        self.buffer_since = None;
        self.inflight.clear();
        self.builder = self.new_builder();
        self.actions.retain(|a| matches!(a, Action::Ack { .. }));
    }

    /// The store committed appends; `next_seq` is its new next seq.
    pub fn handle_appended(&mut self, next_seq: u64, now: Instant) {
        self.store_next = self.store_next.max(next_seq);
        self.pump(now);
    }

    /// A read finished. Records are in seq order starting at the requested `from`.
    pub fn handle_read(&mut self, epoch: u64, records: Vec<Queued>, now: Instant) {
        if epoch != self.epoch {
            return;
        }
        self.reading = false;
        match records.last() {
            Some(last) => self.cursor = last.seq + 1,
            // Nothing at or after the cursor when the read ran, and it ran after every seq
            // below `read_upto` was committed: those are gone (acked or dropped).
            None => self.cursor = self.cursor.max(self.read_upto),
        }
        if self.buffer.is_empty() && !records.is_empty() {
            self.buffer_since = Some(now);
        }
        self.buffer.extend(records);
        self.pump(now);
    }

    /// Records handed over before their commit's fsync (see the module docs). Returns
    /// whether they were taken.
    pub fn handle_tail(&mut self, records: Vec<Queued>, now: Instant) -> bool {
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            return false;
        };
        let caught_up = self.online
            && !self.paused
            && !self.reading
            && self.buffer.is_empty()
            && self.cursor != 0
            && self.cursor == first.seq;
        if !caught_up {
            return false;
        }
        self.cursor = last.seq + 1;
        // Not committed yet: the store's `appended` for them follows and must not cause a read.
        self.store_next = self.store_next.max(self.cursor);
        self.buffer_since = Some(now);
        self.buffer.extend(records);
        self.pump(now);
        true
    }

    /// A read failed; it will be retried at the next event or timeout.
    pub fn handle_read_failed(&mut self, epoch: u64) {
        if epoch == self.epoch {
            self.reading = false;
        }
    }

    /// The broker acknowledged batch `id`. Returns false for an unknown id (e.g. a batch of
    /// an earlier connection).
    pub fn handle_puback(&mut self, id: u64, now: Instant) -> bool {
        let Some(pos) = self.inflight.iter().position(|b| b.id == id) else {
            return false;
        };
        let Some(b) = self.inflight.remove(pos) else {
            return false;
        };
        self.stats.acked_batches += 1;
        self.acked_this_connection = true;
        self.failed_connections = 0;
        self.acks_pending += 1;
        let ack = if b.corrupt.is_empty() {
            Ack::Range {
                first: b.first_seq,
                last: b.last_seq,
            }
        } else {
            Ack::RangeSkipping {
                first: b.first_seq,
                last: b.last_seq,
                corrupt: b.corrupt,
            }
        };
        self.actions.push_back(Action::Ack { ack });
        self.pump(now);
        self.maybe_restore();
        true
    }

    /// A delete issued by an [`Action::Ack`] finished (committed or failed: a failed delete
    /// only means the changes are sent again later).
    pub fn handle_ack_done(&mut self, now: Instant) {
        self.acks_pending = self.acks_pending.saturating_sub(1);
        self.pump(now);
    }

    /// Time passed (for `linger`).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.pump(now);
    }

    /// The next action to perform, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When the engine wants [`Engine::handle_timeout`] called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if !self.online || self.cfg.linger.is_zero() || self.buffer.is_empty() {
            return None;
        }
        if self.inflight.len() >= self.cfg.max_inflight {
            return None;
        }
        self.buffer_since.map(|t| t + self.cfg.linger)
    }

    /// Decides reads and publishes.
    fn pump(&mut self, now: Instant) {
        if !self.online || self.paused {
            return;
        }
        while self.inflight.len() < self.cfg.max_inflight && !self.buffer.is_empty() {
            if !self.linger_over(now) {
                break;
            }
            self.publish_next();
        }
        self.maybe_read();
    }

    /// With `linger`, a batch that is not full (by changes or bytes) waits until the oldest
    /// buffered change has waited `linger`. Changes committed meanwhile are read into the
    /// buffer and join the batch (a backlog fills batches at once, so it never waits).
    fn linger_over(&self, now: Instant) -> bool {
        if self.cfg.linger.is_zero() {
            return true;
        }
        let (max_changes, max_bytes) = self.batch_limits();
        let full = self.buffer.len() >= max_changes
            || self.buffer.iter().map(|q| q.record.len()).sum::<usize>() >= max_bytes;
        let waited = self
            .buffer_since
            .is_none_or(|t| now.duration_since(t) >= self.cfg.linger);
        full || waited
    }

    fn publish_next(&mut self) {
        let mut corrupt = Vec::new();
        while let Some(q) = self.buffer.front() {
            match self.builder.push(q) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    // A damaged record can never be sent, and spliced into a batch it would
                    // make the whole batch undecodable: skip it; it is removed (counted in
                    // `corrupt`) once the batch around it is acknowledged.
                    tracing::error!(
                        seq = q.seq,
                        "{e}; skipping it (never sent, counted in counters.corrupt)"
                    );
                    self.stats.skipped += 1;
                    corrupt.push(q.seq);
                }
            }
            self.buffer.pop_front();
        }
        self.buffer_since = if self.buffer.is_empty() {
            None
        } else {
            self.buffer_since
        };
        let Some(batch) = self.builder.finish() else {
            if !corrupt.is_empty() {
                self.acks_pending += 1;
                self.actions.push_back(Action::Ack {
                    ack: Ack::Corrupt(corrupt),
                });
            }
            return;
        };
        let id = self.next_id;
        self.next_id += 1;
        let (sent, resent) = self.count_sent(&batch);
        self.stats.sent += sent;
        self.stats.resent += resent;
        self.stats.batches += 1;
        self.highest_sent = self.highest_sent.max(batch.last_seq);
        self.inflight.push_back(Inflight {
            id,
            first_seq: batch.first_seq,
            last_seq: batch.last_seq,
            changes: batch.changes,
            corrupt,
        });
        self.actions.push_back(Action::Publish { id, batch });
    }

    /// Splits a batch's changes into first sends and resends. Exact when the batch is all one
    /// or the other (the usual case); otherwise seqs are assumed dense.
    fn count_sent(&self, batch: &Batch) -> (u64, u64) {
        if batch.first_seq > self.highest_sent {
            (batch.changes, 0)
        } else if batch.last_seq <= self.highest_sent {
            (0, batch.changes)
        } else {
            let resent = (self.highest_sent - batch.first_seq + 1).min(batch.changes);
            (batch.changes - resent, resent)
        }
    }

    fn maybe_read(&mut self) {
        if self.reading || (self.acks_pending > 0 && self.cursor == 0) {
            // After a reconnect, deletes in progress must land before reading from the start.
            return;
        }
        if self.cursor >= self.store_next && self.cursor != 0 {
            return;
        }
        // Keep about one batch buffered ahead of the window.
        let (batch_changes, batch_bytes) = self.batch_limits();
        if self.buffer.len() >= batch_changes {
            return;
        }
        let max_changes = batch_changes * 2 - self.buffer.len();
        self.reading = true;
        self.read_upto = self.store_next;
        self.actions.push_back(Action::Read {
            epoch: self.epoch,
            from: self.cursor,
            max_changes,
            max_bytes: batch_bytes.saturating_mul(2),
        });
    }
}

#[cfg(test)]
mod tests;
