//! The engine driven by hand against an in-memory queue and a virtual clock.

use super::*;
use crate::model::change::encode_value;
use crate::store::record;
use serde_json::json;
use std::collections::BTreeMap;

fn cfg(max_inflight: usize, batch_max_changes: usize, linger_ms: u64) -> EngineConfig {
    EngineConfig {
        device: "d".into(),
        encoding: Encoding::Cbor,
        batch_max_changes,
        batch_max_bytes: 1 << 20,
        max_inflight,
        linger: Duration::from_millis(linger_ms),
        compression: Compression::None,
    }
}

/// A fake outbox and the actions the engine asked for.
struct Harness {
    engine: Engine,
    queue: BTreeMap<u64, Vec<u8>>,
    next_seq: u64,
    now: Instant,
    /// Reads not yet answered (to test ordering).
    hold_reads: bool,
    held: Vec<Action>,
    published: Vec<(u64, Batch)>,
    acks: Vec<Ack>,
}

impl Harness {
    fn new(c: EngineConfig) -> Self {
        Self {
            engine: Engine::new(c, 1),
            queue: BTreeMap::new(),
            next_seq: 1,
            now: Instant::now(),
            hold_reads: false,
            held: Vec::new(),
            published: Vec::new(),
            acks: Vec::new(),
        }
    }

    fn append(&mut self, n: usize) {
        for _ in 0..n {
            let v = encode_value("k", &json!(self.next_seq)).unwrap();
            self.queue.insert(self.next_seq, record::encode(1, "k", &v));
            self.next_seq += 1;
        }
        self.engine.handle_appended(self.next_seq, self.now);
        self.run();
    }

    fn read(&self, from: u64, max_changes: usize) -> Vec<Queued> {
        self.queue
            .range(from..)
            .take(max_changes)
            .map(|(s, r)| Queued {
                seq: *s,
                record: r.clone(),
            })
            .collect()
    }

    /// Performs actions until the engine has none. Acks are applied to the queue at once.
    fn run(&mut self) {
        while let Some(a) = self.engine.poll_action() {
            match a {
                Action::Read {
                    epoch,
                    from,
                    max_changes,
                    ..
                } => {
                    if self.hold_reads {
                        self.held.push(Action::Read {
                            epoch,
                            from,
                            max_changes,
                            max_bytes: 0,
                        });
                        continue;
                    }
                    let recs = self.read(from, max_changes);
                    self.engine.handle_read(epoch, recs, self.now);
                }
                Action::Publish { id, batch } => self.published.push((id, batch)),
                Action::Ack { ack } => {
                    match &ack {
                        Ack::Range { first, last } | Ack::RangeSkipping { first, last, .. } => {
                            if let Ack::RangeSkipping { corrupt, .. } = &ack {
                                corrupt.iter().for_each(|k| {
                                    self.queue.remove(k);
                                });
                            }
                            let keys: Vec<u64> =
                                self.queue.range(*first..=*last).map(|(k, _)| *k).collect();
                            for k in keys {
                                self.queue.remove(&k);
                            }
                        }
                        Ack::Seqs(s) | Ack::Corrupt(s) => s.iter().for_each(|k| {
                            self.queue.remove(k);
                        }),
                        Ack::Through(t) => self.queue.retain(|k, _| k > t),
                    }
                    self.acks.push(ack);
                    self.engine.handle_ack_done(self.now);
                }
            }
        }
    }

    fn puback(&mut self, id: u64) {
        assert!(
            self.engine.handle_puback(id, self.now),
            "unknown batch {id}"
        );
        self.run();
    }

    fn connect(&mut self) {
        self.engine.handle_connected(self.now);
        self.run();
    }

    fn seqs(batch: &Batch) -> Vec<u64> {
        let v: serde_json::Value = ciborium::from_reader(&batch.payload[..]).unwrap();
        v["changes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["seq"].as_u64().unwrap())
            .collect()
    }
}

#[test]
fn nothing_happens_while_offline() {
    let mut h = Harness::new(cfg(4, 100, 0));
    h.append(5);
    assert!(h.published.is_empty());
    assert!(h.engine.poll_action().is_none());
}

#[test]
fn a_lone_change_is_published_at_once_when_idle() {
    let mut h = Harness::new(cfg(4, 100, 0));
    h.connect();
    h.append(1);
    assert_eq!(h.published.len(), 1);
    assert_eq!(Harness::seqs(&h.published[0].1), vec![1]);
    assert_eq!(h.engine.poll_timeout(), None);
}

#[test]
fn backlog_on_connect_is_sent_in_order_in_full_batches() {
    let mut h = Harness::new(cfg(2, 10, 0));
    h.append(35);
    h.connect();
    assert_eq!(h.published.len(), 2, "window of 2");
    let mut all = Vec::new();
    let mut next = 0;
    while next < h.published.len() {
        let (id, b) = h.published[next].clone();
        all.extend(Harness::seqs(&b));
        assert!(b.changes <= 10);
        h.puback(id);
        next += 1;
    }
    assert_eq!(all, (1..=35).collect::<Vec<_>>());
    assert!(h.queue.is_empty(), "everything acked is deleted");
    assert!(h.engine.is_drained());
    assert_eq!(h.engine.stats().sent, 35);
    assert_eq!(h.engine.stats().resent, 0);
}

#[test]
fn batches_form_by_themselves_while_the_window_is_full() {
    let mut h = Harness::new(cfg(1, 1000, 0));
    h.connect();
    h.append(1);
    assert_eq!(h.published.len(), 1);
    // 50 more arrive one by one while batch 1 is in flight.
    for _ in 0..50 {
        h.append(1);
    }
    assert_eq!(h.published.len(), 1, "window full: nothing else sent");
    h.puback(h.published[0].0);
    assert_eq!(h.published.len(), 2);
    assert_eq!(
        h.published[1].1.changes, 50,
        "the backlog went as one batch"
    );
}

#[test]
fn puback_deletes_exactly_that_batch_even_out_of_order() {
    let mut h = Harness::new(cfg(3, 2, 0));
    h.append(6);
    h.connect();
    assert_eq!(h.published.len(), 3);
    let ids: Vec<u64> = h.published.iter().map(|p| p.0).collect();
    h.puback(ids[1]);
    assert_eq!(h.acks, vec![Ack::Range { first: 3, last: 4 }]);
    assert_eq!(
        h.queue.keys().copied().collect::<Vec<_>>(),
        vec![1, 2, 5, 6]
    );
    assert!(!h.engine.handle_puback(ids[1], h.now), "acked twice");
}

#[test]
fn reconnect_resends_everything_unacked_from_the_oldest() {
    let mut h = Harness::new(cfg(4, 3, 0));
    h.append(10);
    h.connect();
    let first: Vec<_> = h.published.clone();
    assert_eq!(first.len(), 4);
    h.puback(first[0].0); // 1..=3 acked
    h.engine.handle_disconnected();
    h.run();
    h.published.clear();
    h.connect();
    let mut all = Vec::new();
    let mut i = 0;
    while i < h.published.len() {
        let (id, b) = h.published[i].clone();
        all.extend(Harness::seqs(&b));
        h.puback(id);
        i += 1;
    }
    assert_eq!(all, (4..=10).collect::<Vec<_>>(), "only unacked, in order");
    let s = h.engine.stats();
    assert_eq!(s.sent, 10);
    assert_eq!(s.resent, 7, "4..=10 all went out before the drop");
}

#[test]
fn after_reconnect_reading_waits_for_deletes_in_progress() {
    let mut h = Harness::new(cfg(2, 5, 0));
    h.append(5);
    h.connect();
    let (id, _) = h.published[0].clone();
    // PUBACK arrives; its delete is issued but not done yet.
    assert!(h.engine.handle_puback(id, h.now));
    let ack = h.engine.poll_action();
    assert!(matches!(ack, Some(Action::Ack { .. })));
    h.engine.handle_disconnected();
    h.engine.handle_connected(h.now);
    assert_eq!(
        h.engine.poll_action(),
        None,
        "no read before the delete lands"
    );
    h.queue.clear();
    h.engine.handle_ack_done(h.now);
    assert!(matches!(
        h.engine.poll_action(),
        Some(Action::Read { from: 0, .. })
    ));
}

#[test]
fn reads_of_an_earlier_connection_are_ignored() {
    let mut h = Harness::new(cfg(2, 5, 0));
    h.hold_reads = true;
    h.append(3);
    h.connect();
    let Some(Action::Read { epoch, .. }) = h.held.pop() else {
        panic!("expected a read")
    };
    h.engine.handle_disconnected();
    h.engine.handle_connected(h.now);
    h.engine.handle_read(epoch, h.read(0, 10), h.now);
    // The stale answer produced no publish; the new connection's read is pending.
    while let Some(a) = h.engine.poll_action() {
        assert!(matches!(a, Action::Read { .. }), "{a:?}");
    }
}

#[test]
fn appends_during_a_read_are_not_skipped() {
    let mut h = Harness::new(cfg(2, 5, 0));
    h.connect();
    h.hold_reads = true;
    h.append(1); // read issued for seq 1 with read_upto = 2
    let Some(Action::Read { epoch, from, .. }) = h.held.pop() else {
        panic!("expected a read")
    };
    // Seq 1 got dropped before the read ran, and seq 2 was appended meanwhile.
    h.queue.clear();
    h.hold_reads = false;
    let v = encode_value("k", &json!(2)).unwrap();
    h.queue.insert(2, record::encode(1, "k", &v));
    h.next_seq = 3;
    h.engine.handle_read(
        epoch,
        h.read(from, 10).into_iter().filter(|q| q.seq < 2).collect(),
        h.now,
    );
    h.engine.handle_appended(3, h.now);
    h.run();
    assert_eq!(h.published.len(), 1);
    assert_eq!(Harness::seqs(&h.published[0].1), vec![2]);
}

#[test]
fn linger_holds_a_small_batch_until_it_expires() {
    let mut h = Harness::new(cfg(4, 100, 20));
    h.connect();
    h.append(3);
    assert!(h.published.is_empty(), "lingering");
    let deadline = h.engine.poll_timeout().unwrap();
    assert_eq!(deadline, h.now + Duration::from_millis(20));
    h.now += Duration::from_millis(19);
    h.engine.handle_timeout(h.now);
    h.run();
    assert!(h.published.is_empty());
    h.now += Duration::from_millis(1);
    h.engine.handle_timeout(h.now);
    h.run();
    assert_eq!(h.published.len(), 1);
    assert_eq!(h.published[0].1.changes, 3);
}

#[test]
fn linger_does_not_hold_a_full_batch() {
    let mut h = Harness::new(cfg(4, 10, 1000));
    h.connect();
    h.append(25);
    assert_eq!(h.published.len(), 2, "two full batches go at once");
    assert_eq!(h.published[0].1.changes, 10);
}

#[test]
fn an_unreadable_record_is_skipped_and_deleted_not_wedging_the_queue() {
    let mut h = Harness::new(cfg(2, 10, 0));
    h.append(3);
    h.queue.insert(2, vec![0xff]);
    h.connect();
    assert_eq!(Harness::seqs(&h.published[0].1), vec![1, 3]);
    assert_eq!(h.engine.stats().skipped, 1);
    h.puback(h.published[0].0);
    assert!(h.queue.is_empty());
}

#[test]
fn damaged_records_at_a_batch_edge_or_alone_are_all_removed() {
    // Batches of 2: 1, 2 then a damaged 3 ends the first batch (it was taken before 4 did
    // not fit); 5 and 6 damaged and alone at the end.
    let mut h = Harness::new(cfg(2, 2, 0));
    h.append(6);
    for seq in [3, 5, 6] {
        h.queue.insert(seq, vec![0x83, 0x00, 0x61, b'k', 0xf7]);
    }
    h.connect();
    while let Some((id, _)) = h.published.first().cloned() {
        h.published.remove(0);
        h.puback(id);
    }
    assert!(
        h.queue.is_empty(),
        "left: {:?}",
        h.queue.keys().collect::<Vec<_>>()
    );
    assert_eq!(h.engine.stats().skipped, 3);
    let mut corrupt: Vec<u64> = h
        .acks
        .iter()
        .filter_map(|a| match a {
            Ack::Corrupt(s) | Ack::RangeSkipping { corrupt: s, .. } => Some(s.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    corrupt.sort_unstable();
    assert_eq!(corrupt, vec![3, 5, 6]);
}

#[test]
fn drained_only_when_everything_is_acked_and_deleted() {
    let mut h = Harness::new(cfg(2, 10, 0));
    h.connect();
    assert!(h.engine.is_drained());
    h.append(3);
    assert!(!h.engine.is_drained());
    h.puback(h.published[0].0);
    assert!(h.engine.is_drained());
}

#[test]
fn paused_engine_finishes_the_window_but_sends_nothing_new() {
    let mut h = Harness::new(cfg(2, 5, 0));
    h.append(30);
    h.connect();
    assert_eq!(h.published.len(), 2);
    h.engine.pause();
    let (a, b) = (h.published[0].0, h.published[1].0);
    h.puback(a);
    h.puback(b);
    assert_eq!(h.published.len(), 2, "nothing new while paused");
    assert_eq!(h.engine.inflight(), 0, "the window drained");
    // The next connection resumes from the oldest unacked change.
    h.engine.handle_disconnected();
    h.connect();
    assert_eq!(Harness::seqs(&h.published[2].1)[0], 11);
}

#[test]
fn reconfigure_changes_the_next_batches() {
    let mut h = Harness::new(cfg(1, 100, 0));
    h.connect();
    h.engine.reconfigure(cfg(1, 3, 0));
    h.append(10);
    assert_eq!(h.published[0].1.changes, 3);
}

#[test]
fn compression_applies_from_the_next_batch_and_to_shrunk_batches() {
    use crate::model::compress::{gunzip, is_compressed};
    let gzip = |max_inflight, changes| EngineConfig {
        compression: Compression::Gzip,
        ..cfg(max_inflight, changes, 0)
    };
    let mut h = Harness::new(cfg(1, 100, 0));
    h.connect();
    h.engine.reconfigure(gzip(1, 100));
    h.append(50);
    let (id, batch) = h.published[0].clone();
    assert!(is_compressed(&batch.payload));
    let plain: serde_json::Value =
        ciborium::from_reader(&gunzip(&batch.payload).unwrap()[..]).unwrap();
    assert_eq!(plain["changes"].as_array().unwrap().len(), 50);
    assert_eq!(
        (batch.first_seq, batch.last_seq, batch.changes),
        (1, 50, 50)
    );
    h.puback(id);
    assert_eq!(h.acks.last(), Some(&Ack::Range { first: 1, last: 50 }));
    // Halved limits (a link that never gets a batch through) keep the compression.
    // (The first connection had its PUBACK: it does not count.)
    for _ in 0..=SHRINK_AFTER {
        h.append(40);
        h.engine.handle_disconnected();
        h.connect();
    }
    let (id, shrunk) = h.published.last().unwrap().clone();
    assert_eq!(shrunk.changes, 50, "halved from 100");
    assert!(is_compressed(&shrunk.payload));
    // And back to none.
    h.engine.reconfigure(cfg(1, 100, 0));
    h.puback(id);
    let last = &h.published.last().unwrap().1;
    assert!(!is_compressed(&last.payload), "the batch after the reload");
}

impl Harness {
    /// `n` changes handed over before their commit: offered to the engine as a tail, then
    /// committed (queued) and signalled as appended. Returns whether the tail was taken.
    fn append_with_tail(&mut self, n: usize) -> bool {
        let mut tail = Vec::new();
        for _ in 0..n {
            let v = encode_value("k", &json!(self.next_seq)).unwrap();
            let rec = record::encode(1, "k", &v);
            tail.push(Queued {
                seq: self.next_seq,
                record: rec.clone(),
            });
            self.queue.insert(self.next_seq, rec);
            self.next_seq += 1;
        }
        let taken = self.engine.handle_tail(tail, self.now);
        self.run();
        self.engine.handle_appended(self.next_seq, self.now);
        self.run();
        taken
    }
}

#[test]
fn a_tail_is_published_before_its_commit_when_caught_up_and_not_read_again() {
    let mut h = Harness::new(cfg(4, 100, 0));
    h.connect();
    h.hold_reads = true;
    assert!(h.append_with_tail(2), "caught up: taken");
    assert_eq!(h.published.len(), 1);
    assert_eq!(Harness::seqs(&h.published[0].1), vec![1, 2]);
    assert!(h.held.is_empty(), "the commit's appended caused no read");
    h.puback(h.published[0].0);
    assert!(h.queue.is_empty());
    assert!(h.engine.is_drained());
    assert_eq!(h.engine.stats().sent, 2);
}

#[test]
fn a_tail_is_ignored_unless_it_starts_at_the_cursor_with_nothing_pending() {
    // Offline.
    let mut h = Harness::new(cfg(4, 100, 0));
    assert!(!h.append_with_tail(1));
    assert!(h.published.is_empty());
    // Connected, but the first read from the start has not been answered yet.
    let mut h = Harness::new(cfg(4, 100, 0));
    h.hold_reads = true;
    h.connect();
    assert!(!h.append_with_tail(1), "a read is outstanding");
    h.hold_reads = false;
    let held = std::mem::take(&mut h.held);
    for a in held {
        if let Action::Read {
            epoch,
            from,
            max_changes,
            ..
        } = a
        {
            let recs = h.read(from, max_changes);
            h.engine.handle_read(epoch, recs, h.now);
        }
    }
    h.run();
    assert_eq!(
        Harness::seqs(&h.published[0].1),
        vec![1],
        "read from the store"
    );
    // Behind: changes buffered while the window is full.
    let mut h = Harness::new(cfg(1, 100, 0));
    h.connect();
    h.append(1);
    h.append(1);
    assert!(!h.append_with_tail(1), "the buffer holds seq 2");
    h.puback(h.published[0].0);
    assert_eq!(Harness::seqs(&h.published[1].1), vec![2, 3]);
    // A gap (seqs skipped after a failed commit): not at the cursor.
    let mut h = Harness::new(cfg(4, 100, 0));
    h.connect();
    h.next_seq += 5;
    assert!(!h.append_with_tail(1));
    assert_eq!(Harness::seqs(&h.published[0].1), vec![6], "read instead");
}

#[test]
fn a_tail_whose_commit_failed_is_acked_as_a_no_op_and_later_seqs_flow() {
    let mut h = Harness::new(cfg(4, 100, 0));
    h.connect();
    assert!(h.append_with_tail(1));
    // The commit failed: the change never became queued; the store skips past its seq.
    h.queue.remove(&1);
    h.puback(h.published[0].0);
    h.next_seq += 3;
    h.append(1);
    assert_eq!(Harness::seqs(&h.published[1].1), vec![5]);
    h.puback(h.published[1].0);
    assert!(h.engine.is_drained());
}

#[test]
fn linger_gathers_changes_that_arrive_one_by_one() {
    let mut h = Harness::new(cfg(4, 100, 20));
    h.connect();
    let start = h.now;
    for _ in 0..4 {
        h.append(1);
        h.now += Duration::from_millis(4);
        h.engine.handle_timeout(h.now);
        h.run();
    }
    assert!(h.published.is_empty(), "still lingering: {:?}", h.published);
    assert_eq!(
        h.engine.poll_timeout(),
        Some(start + Duration::from_millis(20))
    );
    h.now = start + Duration::from_millis(20);
    h.engine.handle_timeout(h.now);
    h.run();
    assert_eq!(h.published.len(), 1);
    assert_eq!(Harness::seqs(&h.published[0].1), vec![1, 2, 3, 4]);
}

#[test]
fn linger_does_not_hold_a_batch_full_by_bytes() {
    let mut c = cfg(4, 1000, 1000);
    c.batch_max_bytes = 200;
    let mut h = Harness::new(c);
    h.connect();
    // About 6 bytes a record: more than 200 bytes buffered.
    h.append(100);
    assert!(!h.published.is_empty(), "full by bytes: sent at once");
}

#[test]
fn batches_shrink_after_connections_that_never_get_one_through_and_grow_back() {
    let mut h = Harness::new(cfg(1, 8, 0));
    h.append(40);
    let sizes = |h: &mut Harness| -> Vec<usize> {
        let s = h
            .published
            .iter()
            .map(|(_, b)| Harness::seqs(b).len())
            .collect();
        h.published.clear();
        s
    };
    // Each connection drops with its first batch in flight, unacknowledged.
    let fail = |h: &mut Harness| {
        h.connect();
        h.engine.handle_disconnected();
        h.engine.handle_disconnected(); // the driver calls it twice: counted once
        h.run();
        sizes(h)
    };
    for want in [8, 8, 8, 4, 4, 4, 2, 2, 2, 1, 1, 1, 1] {
        assert_eq!(fail(&mut h), vec![want]);
    }
    assert_eq!(h.engine.batch_limits().0, 1, "never below one change");
    // A connection that gets a batch through resets the count of failures.
    h.connect();
    let (id, _) = h.published[0].clone();
    h.puback(id);
    h.engine.handle_disconnected();
    h.run();
    assert_eq!(sizes(&mut h), vec![1, 1]);
    assert_eq!(fail(&mut h), vec![1]);
    // Caught up: back to the configured limit.
    h.connect();
    while let Some((id, _)) = h.published.pop() {
        h.puback(id);
    }
    assert!(h.queue.is_empty());
    assert_eq!(h.engine.batch_limits().0, 8);
    h.append(20);
    assert_eq!(sizes(&mut h)[0], 8);
}
