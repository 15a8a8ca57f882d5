use super::*;
use crate::model::change::{NewChange, encode_value};
use redb::ReadableTableMetadata;
use serde_json::json;

fn opts(dir: &Path, max_bytes: u64, when_full: WhenFull) -> StoreOptions {
    StoreOptions {
        path: dir.join("store.redb"),
        max_bytes,
        when_full,
        cache_size: 1 << 20,
    }
}

fn change(key: &str, value: serde_json::Value) -> NewChange {
    NewChange {
        key: key.into(),
        value: encode_value(key, &value).unwrap(),
        ts: None,
        origin: crate::model::change::Origin::Device,
    }
}

fn sized(key: &str, n: usize) -> NewChange {
    change(key, json!("v".repeat(n)))
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn all_seqs(outbox: &Outbox) -> Vec<u64> {
    outbox
        .read_from(0, usize::MAX, usize::MAX)
        .unwrap()
        .iter()
        .map(|q| q.seq)
        .collect()
}

#[test]
fn seqs_increase_and_survive_reopen_even_when_queue_emptied() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path(), 1 << 30, WhenFull::DropOldest);
    let rt = rt();
    let mut last = 0;
    for round in 0..3 {
        let outbox = Outbox::open(&o).unwrap();
        rt.block_on(async {
            for i in 0..5 {
                let a = outbox
                    .append(vec![change("k", json!(i)), change("j", json!(i))])
                    .await
                    .unwrap();
                assert_eq!(a.last_seq, a.first_seq + 1);
                assert!(a.first_seq > last, "round {round}: {a:?} after {last}");
                last = a.last_seq;
            }
            if round == 1 {
                // Empty the queue: seqs must still never be reused.
                let acked = outbox.ack(Ack::Through(last)).await.unwrap();
                assert!(acked.changes > 0);
                assert_eq!(outbox.stats().depth, 0);
                assert_eq!(outbox.stats().bytes, 0);
            }
            outbox.shutdown().await;
        });
    }
    let outbox = Outbox::open(&o).unwrap();
    assert_eq!(outbox.stats().next_seq, last + 1);
    let seqs = all_seqs(&outbox);
    assert_eq!(seqs.len(), 10, "only round 2 remains queued");
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    outbox.shutdown_blocking();
}

#[test]
fn records_keep_key_value_and_timestamp() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(&opts(dir.path(), 1 << 30, WhenFull::Reject)).unwrap();
    let rt = rt();
    let mut c = change("led.mode", json!({"blink": [1, 2]}));
    c.ts = Some(1_764_150_000_000);
    let a = rt.block_on(outbox.append(vec![c.clone()])).unwrap();
    let q = outbox.read_from(a.first_seq, 10, 1 << 20).unwrap();
    assert_eq!(q.len(), 1);
    let r = q[0].decode().unwrap();
    assert_eq!(
        (r.key, r.ts, r.value),
        ("led.mode", 1_764_150_000_000, &c.value[..])
    );
    assert_eq!(outbox.oldest_ts().unwrap(), Some(1_764_150_000_000));
    outbox.shutdown_blocking();
}

#[test]
fn concurrent_appends_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(&opts(dir.path(), 1 << 30, WhenFull::Reject)).unwrap();
    let rt = rt();
    let before = outbox.commits();
    let results = rt.block_on(async {
        // Submit many requests before awaiting any: the writer takes them in few batches.
        let mut pending = Vec::new();
        for i in 0..2000 {
            pending.push(outbox.submit(vec![change("k", json!(i))]).await.unwrap());
        }
        let mut out = Vec::new();
        for p in pending {
            out.push(p.await.unwrap().unwrap());
        }
        out
    });
    let commits = outbox.commits() - before;
    assert!(commits < 200, "2000 requests took {commits} commits");
    // Seqs follow submission order.
    assert!(
        results
            .windows(2)
            .all(|w| w[1].first_seq == w[0].last_seq + 1)
    );
    assert_eq!(outbox.stats().depth, 2000);
    outbox.shutdown_blocking();
}

#[test]
fn drop_oldest_evicts_and_counts_and_keeps_bound() {
    let dir = tempfile::tempdir().unwrap();
    let max = 64 * 1024;
    let o = opts(dir.path(), max, WhenFull::DropOldest);
    let outbox = Outbox::open(&o).unwrap();
    let rt = rt();
    let mut last = 0;
    rt.block_on(async {
        // Few keys: their latest values count against `max` too (see the state tests).
        for i in 0..200 {
            last = outbox
                .append(vec![sized(&format!("k{}", i % 8), 1000)])
                .await
                .unwrap()
                .last_seq;
            assert!(outbox.stats().bytes <= max);
        }
    });
    let s = outbox.stats();
    assert!(s.dropped > 0);
    assert_eq!(s.depth + s.dropped, 200);
    assert_eq!(s.rejected, 0);
    let seqs = all_seqs(&outbox);
    assert_eq!(seqs.len() as u64, s.depth);
    assert_eq!(*seqs.last().unwrap(), last, "newest kept");
    assert_eq!(seqs[0], s.dropped + 1, "oldest dropped first");
    outbox.shutdown_blocking();
    drop(outbox);
    // Counters persist.
    let outbox = Outbox::open(&o).unwrap();
    assert_eq!(outbox.stats().dropped, s.dropped);
    assert_eq!(outbox.stats().bytes, s.bytes);
    outbox.shutdown_blocking();
}

#[test]
fn reject_refuses_whole_request_with_store_full_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let max = 32 * 1024;
    let o = opts(dir.path(), max, WhenFull::Reject);
    let outbox = Outbox::open(&o).unwrap();
    let rt = rt();
    let (accepted, err) = rt.block_on(async {
        let mut accepted = 0;
        loop {
            match outbox.append(vec![sized("a", 500), sized("b", 500)]).await {
                Ok(_) => accepted += 2,
                Err(e) => return (accepted, e),
            }
        }
    });
    assert_eq!(err.code(), "store-full");
    let s = outbox.stats();
    assert_eq!(s.depth, accepted);
    assert_eq!(s.rejected, 2, "both changes of the refused request count");
    assert!(s.bytes <= max);
    // After an ack there is room again.
    rt.block_on(outbox.ack(Ack::Through(4))).unwrap();
    rt.block_on(outbox.append(vec![sized("c", 500)])).unwrap();
    outbox.shutdown_blocking();
    drop(outbox);
    let outbox = Outbox::open(&o).unwrap();
    assert_eq!(outbox.stats().rejected, 2);
    outbox.shutdown_blocking();
}

#[test]
fn a_request_larger_than_the_store_is_refused_even_with_drop_oldest() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(&opts(dir.path(), 4096, WhenFull::DropOldest)).unwrap();
    let rt = rt();
    rt.block_on(outbox.append(vec![sized("a", 100)])).unwrap();
    let err = rt
        .block_on(outbox.append(vec![sized("b", 3000), sized("c", 3000)]))
        .unwrap_err();
    assert_eq!(err.code(), "store-full");
    assert_eq!(
        outbox.stats().depth,
        1,
        "nothing evicted for a hopeless request"
    );
    outbox.shutdown_blocking();
}

#[test]
fn ack_through_and_ack_seqs_delete_exactly_those() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(&opts(dir.path(), 1 << 30, WhenFull::Reject)).unwrap();
    let rt = rt();
    rt.block_on(async {
        let batch: Vec<_> = (0..10).map(|i| change("k", json!(i))).collect();
        outbox.append(batch).await.unwrap();
        let a = outbox.ack(Ack::Through(3)).await.unwrap();
        assert_eq!(a.changes, 3);
        assert_eq!(all_seqs(&outbox), vec![4, 5, 6, 7, 8, 9, 10]);
        let a = outbox.ack(Ack::Seqs(vec![5, 7, 7, 42])).await.unwrap();
        assert_eq!(a.changes, 2, "duplicates and unknown seqs are no-ops");
        assert_eq!(all_seqs(&outbox), vec![4, 6, 8, 9, 10]);
        let a = outbox.ack(Ack::Range { first: 8, last: 9 }).await.unwrap();
        assert_eq!(a.changes, 2);
        assert_eq!(all_seqs(&outbox), vec![4, 6, 10]);
        let s = outbox.stats();
        assert_eq!((s.depth, s.acked), (3, 7));
        outbox.ack(Ack::Through(100)).await.unwrap();
        let s = outbox.stats();
        assert_eq!((s.depth, s.bytes, s.acked), (0, 0, 10));
    });
    outbox.shutdown_blocking();
}

#[test]
fn purge_drops_everything_queued_as_dropped_and_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path(), 1 << 30, WhenFull::Reject);
    let outbox = Outbox::open(&o).unwrap();
    let rt = rt();
    rt.block_on(async {
        let batch: Vec<_> = (0..10).map(|i| change("k", json!(i))).collect();
        outbox.append(batch).await.unwrap();
        outbox.ack(Ack::Through(2)).await.unwrap();
        let bytes = outbox.stats().bytes;
        let p = outbox.purge().await.unwrap();
        assert_eq!((p.changes, p.bytes), (8, bytes));
        let s = outbox.stats();
        assert_eq!((s.depth, s.bytes, s.acked, s.dropped), (0, 0, 2, 8));
        assert!(all_seqs(&outbox).is_empty());
        assert_eq!(outbox.purge().await.unwrap().changes, 0);
        // Seqs are not reused; acking a purged seq is a no-op.
        let a = outbox.append(vec![change("k", json!(1))]).await.unwrap();
        assert_eq!(a.first_seq, 11);
        let a = outbox.ack(Ack::Range { first: 3, last: 10 }).await.unwrap();
        assert_eq!(a.changes, 0);
    });
    outbox.shutdown_blocking();
    drop(outbox);
    let outbox = Outbox::open(&o).unwrap();
    let s = outbox.stats();
    assert_eq!((s.depth, s.dropped, s.next_seq), (1, 8, 12));
    outbox.shutdown_blocking();
}

#[test]
fn read_from_respects_limits_but_returns_at_least_one() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(&opts(dir.path(), 1 << 30, WhenFull::Reject)).unwrap();
    let rt = rt();
    let batch: Vec<_> = (0..10).map(|i| sized(&format!("k{i}"), 100)).collect();
    rt.block_on(outbox.append(batch)).unwrap();
    assert_eq!(outbox.read_from(1, 4, usize::MAX).unwrap().len(), 4);
    assert_eq!(outbox.read_from(8, 100, usize::MAX).unwrap().len(), 3);
    assert_eq!(outbox.read_from(1, 100, 250).unwrap().len(), 2);
    assert_eq!(outbox.read_from(1, 100, 1).unwrap().len(), 1);
    assert!(outbox.read_from(11, 100, 1).unwrap().is_empty());
    outbox.shutdown_blocking();
}

#[test]
fn reported_holds_the_latest_value_per_key() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path(), 1 << 30, WhenFull::Reject);
    let outbox = Outbox::open(&o).unwrap();
    let rt = rt();
    rt.block_on(async {
        outbox
            .append(vec![change("a", json!(1)), change("a", json!(2))])
            .await
            .unwrap();
        outbox.append(vec![change("b", json!("x"))]).await.unwrap();
        // Acked changes leave the queue, not the reported state.
        outbox.ack(Ack::Through(100)).await.unwrap();
    });
    outbox.shutdown_blocking();
    drop(outbox);
    let outbox = Outbox::open(&o).unwrap();
    let all = outbox.reported(None).unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all["a"].value, json!(2));
    assert_eq!(all["a"].seq, 2);
    let one = outbox.reported(Some("b")).unwrap();
    assert_eq!(one["b"].value, json!("x"));
    assert!(outbox.reported(Some("zzz")).unwrap().is_empty());
    outbox.shutdown_blocking();
}

#[test]
fn a_file_that_is_not_a_store_is_an_error_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path(), 1 << 30, WhenFull::Reject);
    let junk: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + 3) as u8).collect();
    std::fs::write(&o.path, &junk).unwrap();
    let err = Outbox::open(&o).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&o.path.display().to_string()), "{msg}");
    assert!(msg.contains("move the file aside"), "{msg}");
    assert_eq!(std::fs::read(&o.path).unwrap(), junk, "never replaced");
}

#[test]
fn a_second_writer_is_told_the_store_is_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path(), 1 << 30, WhenFull::Reject);
    let first = Outbox::open(&o).unwrap();
    let err = Outbox::open(&o).unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    first.shutdown_blocking();
}

#[test]
fn requests_after_shutdown_fail_closed() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(&opts(dir.path(), 1 << 30, WhenFull::Reject)).unwrap();
    outbox.shutdown_blocking();
    let err = rt()
        .block_on(outbox.append(vec![change("a", json!(1))]))
        .unwrap_err();
    assert!(matches!(err, StoreError::Closed));
}

#[test]
fn store_directory_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path(), 1 << 30, WhenFull::Reject);
    o.path = dir.path().join("a/b/store.redb");
    let outbox = Outbox::open(&o).unwrap();
    outbox.shutdown_blocking();
    assert!(o.path.exists());
}

#[test]
fn transact_commits_own_tables_and_appends_atomically() {
    const T: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("test_t");
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path(), 1 << 30, WhenFull::Reject);
    let outbox = Outbox::open(&o).unwrap();
    let rt = rt();
    let mut c = change("led", json!("on"));
    c.origin = crate::model::change::Origin::Cloud;
    let appended = rt
        .block_on(outbox.transact(move |ctx| {
            ctx.txn.open_table(T)?.insert("x", 7)?;
            ctx.append(&[c])
        }))
        .unwrap()
        .unwrap();
    assert_eq!(appended.first_seq, 1);
    assert_eq!(outbox.stats().depth, 1);
    let txn = outbox.read().unwrap();
    assert_eq!(
        txn.open_table(T)
            .unwrap()
            .get("x")
            .unwrap()
            .unwrap()
            .value(),
        7
    );
    let q = outbox.read_from(0, 10, 1 << 20).unwrap();
    assert_eq!(q[0].decode().unwrap().origin, Some("cloud"));
    assert_eq!(
        outbox.reported(Some("led")).unwrap()["led"].value,
        json!("on")
    );
    outbox.shutdown_blocking();
}

#[test]
fn a_file_left_by_an_interrupted_creation_is_set_aside_and_replaced() {
    // What a power cut before redb wrote its magic number leaves: length set, zeros.
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path(), 1 << 30, WhenFull::Reject);
    let mut image = vec![0u8; 73_728];
    image[40] = 3; // part of the header, without the magic number
    std::fs::write(&o.path, &image).unwrap();
    let outbox = Outbox::open(&o).unwrap();
    assert_eq!(outbox.stats().next_seq, 1);
    outbox.shutdown_blocking();
    let aside = dir.path().join("store.redb.incomplete");
    assert_eq!(std::fs::read(aside).unwrap(), image, "kept for inspection");
}

#[test]
fn a_large_file_without_magic_is_refused_not_set_aside() {
    // Larger than anything redb's creation leaves: someone else's file, left alone.
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path(), 1 << 30, WhenFull::Reject);
    let image = vec![0u8; (INCOMPLETE_MAX_LEN + 1) as usize];
    std::fs::write(&o.path, &image).unwrap();
    let err = Outbox::open(&o).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(!dir.path().join("store.redb.incomplete").exists());
    assert_eq!(std::fs::read(&o.path).unwrap().len(), image.len());
}

#[test]
fn no_space_is_store_full_for_callers() {
    let e = StoreError::from(redb::Error::Io(std::io::Error::from_raw_os_error(28)));
    assert!(matches!(e, StoreError::NoSpace(_)), "{e}");
    assert_eq!(e.code(), "store-full");
    let e = StoreError::from(redb::Error::Io(std::io::Error::from_raw_os_error(122)));
    assert_eq!(e.code(), "store-full");
    let e = StoreError::from(redb::Error::Io(std::io::Error::from_raw_os_error(5)));
    assert_eq!(e.code(), "io-error");
}

/// Opens the store, waiting for an earlier handle's writer thread to let go of the file.
fn open_when_free(o: &StoreOptions) -> Outbox {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match Outbox::open(o) {
            Ok(outbox) => return outbox,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                std::thread::yield_now();
            }
            Err(e) => panic!("reopen: {e}"),
        }
    }
}

#[test]
fn the_tail_hands_over_records_before_the_commit_only_under_a_durable_reservation() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path(), 1 << 30, WhenFull::DropOldest);
    let outbox = Outbox::open(&o).unwrap();
    let rt = rt();
    let mut tail = outbox.tail();
    rt.block_on(async {
        // No reservation on disk yet: the first commit only makes one.
        outbox.append(vec![change("k", json!(1))]).await.unwrap();
        assert!(tail.try_recv().is_err(), "seq 1 was not covered");
        let a = outbox
            .append(vec![change("k", json!(2)), change("j", json!(3))])
            .await
            .unwrap();
        let handed = tail.try_recv().expect("seqs 2 and 3 handed over");
        assert_eq!(
            handed,
            outbox.read_from(a.first_seq, 10, usize::MAX).unwrap()
        );
        assert_eq!(handed.iter().map(|q| q.seq).collect::<Vec<_>>(), vec![2, 3]);
        // A commit larger than the tail's bound is left to reads.
        let big: Vec<NewChange> = (0..TAIL_MAX + 1).map(|i| change("b", json!(i))).collect();
        outbox.append(big).await.unwrap();
        assert!(tail.try_recv().is_err());
        // Nobody listening: nothing is kept for them, and the reservation is released.
        drop(tail);
        outbox.append(vec![change("k", json!(4))]).await.unwrap();
        outbox.shutdown().await;
    });
}

#[test]
fn a_receiver_that_falls_behind_holds_at_most_tail_depth_commits() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path(), 1 << 30, WhenFull::DropOldest);
    let outbox = Outbox::open(&o).unwrap();
    let rt = rt();
    let mut tail = outbox.tail();
    rt.block_on(async {
        // Never read while 3 × TAIL_DEPTH commits go in.
        for i in 0..3 * TAIL_DEPTH {
            outbox.append(vec![change("k", json!(i))]).await.unwrap();
        }
        let mut held = 0;
        while let Ok(batch) = tail.try_recv() {
            // What was handed over is what the store holds.
            let first = batch[0].seq;
            assert_eq!(
                batch,
                outbox.read_from(first, batch.len(), usize::MAX).unwrap()
            );
            held += 1;
        }
        assert_eq!(held, TAIL_DEPTH);
        outbox.shutdown().await;
    });
}

#[test]
fn after_a_crash_with_a_listener_seqs_continue_past_the_reservation() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path(), 1 << 30, WhenFull::DropOldest);
    let rt = rt();
    let outbox = Outbox::open(&o).unwrap();
    let tail = outbox.tail();
    let last = rt.block_on(async {
        outbox.append(vec![change("k", json!(1))]).await.unwrap();
        outbox
            .append(vec![change("k", json!(2))])
            .await
            .unwrap()
            .last_seq
    });
    // A crash: the handles go without a shutdown (the writer just stops).
    drop(tail);
    drop(outbox);
    let outbox = open_when_free(&o);
    let next = outbox.stats().next_seq;
    assert_eq!(
        next,
        last + 1 + SEQ_RESERVE,
        "seqs that may have been sent are skipped"
    );
    let a = rt
        .block_on(outbox.append(vec![change("k", json!(3))]))
        .unwrap();
    assert_eq!(a.first_seq, next);
    assert_eq!(
        all_seqs(&outbox),
        vec![1, 2, next],
        "nothing committed was lost"
    );
    outbox.shutdown_blocking();
}

#[test]
fn a_clean_shutdown_releases_the_reservation_and_no_listener_reserves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path(), 1 << 30, WhenFull::DropOldest);
    let rt = rt();
    let outbox = Outbox::open(&o).unwrap();
    let _tail = outbox.tail();
    rt.block_on(async {
        for i in 0..3 {
            outbox.append(vec![change("k", json!(i))]).await.unwrap();
        }
        outbox.shutdown().await;
    });
    drop(outbox);
    let outbox = open_when_free(&o);
    assert_eq!(outbox.stats().next_seq, 4, "no gap after a clean stop");
    // Without a listener a crash leaves no gap either.
    rt.block_on(outbox.append(vec![change("k", json!(9))]))
        .unwrap();
    drop(outbox);
    let outbox = open_when_free(&o);
    assert_eq!(outbox.stats().next_seq, 5);
    outbox.shutdown_blocking();
}

/// What the state tables hold, computed from the rows (the accounting must agree).
fn counted_state(outbox: &Outbox) -> u64 {
    let txn = outbox.read().unwrap();
    let table = txn.open_table(REPORTED).unwrap();
    table
        .iter()
        .unwrap()
        .map(|item| {
            let (k, v) = item.unwrap();
            reported_row_cost(k.value(), v.value().1.len())
        })
        .sum()
}

#[test]
fn latest_values_count_against_max_bytes_and_new_keys_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let max = 64 * 1024;
    for when_full in [WhenFull::DropOldest, WhenFull::Reject] {
        let o = opts(&dir.path().join(format!("{when_full:?}")), max, when_full);
        let outbox = Outbox::open(&o).unwrap();
        let rt = rt();
        let (accepted, err) = rt.block_on(async {
            for i in 0..1000 {
                if let Err(e) = outbox.append(vec![sized(&format!("k{i}"), 1000)]).await {
                    return (i, e);
                }
            }
            panic!("the state never filled up");
        });
        let s = outbox.stats();
        assert!(matches!(err, StoreError::StateFull { .. }), "{err}");
        assert_eq!(err.code(), "store-full");
        assert!(err.to_string().contains("latest values"), "{err}");
        assert_eq!(s.max_state_bytes, max / 2);
        assert!(s.state_bytes <= max / 2, "{s:?}");
        assert!(s.state_bytes + s.bytes <= max, "{s:?}");
        assert_eq!(s.state_bytes, counted_state(&outbox));
        // About half of max: each key costs its record + key + seq + overhead.
        assert!(accepted > 25 && accepted < 32, "{accepted}");
        assert_eq!(s.rejected, 1);
        // Existing keys: never refused for the state (drop-oldest evicts; reject refuses
        // only once the queue is full, with the queue's message).
        for i in 0..200 {
            let r = rt.block_on(outbox.append(vec![sized(&format!("k{}", i % accepted), 1000)]));
            match (when_full, r) {
                (_, Ok(_)) => {}
                (WhenFull::Reject, Err(e @ StoreError::Full { .. })) => {
                    assert!(e.to_string().contains("queued"), "{e}");
                    break;
                }
                (_, Err(e)) => panic!("existing key refused: {e}"),
            }
            let s = outbox.stats();
            assert!(s.state_bytes + s.bytes <= max, "{s:?}");
        }
        // A smaller value shrinks the state; the figure survives a reopen.
        rt.block_on(outbox.ack(Ack::Through(u64::MAX))).unwrap();
        rt.block_on(outbox.append(vec![sized("k0", 10)])).unwrap();
        let s = outbox.stats();
        assert_eq!(s.state_bytes, counted_state(&outbox));
        outbox.shutdown_blocking();
        drop(outbox);
        let outbox = Outbox::open(&o).unwrap();
        assert_eq!(outbox.stats().state_bytes, s.state_bytes);
        outbox.shutdown_blocking();
    }
}

#[test]
fn repeated_keys_in_one_request_or_group_count_once() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path(), 1 << 20, WhenFull::Reject);
    let outbox = Outbox::open(&o).unwrap();
    let rt = rt();
    rt.block_on(async {
        let reqs: Vec<_> = (0..20)
            .map(|i| outbox.submit(vec![sized("a", 100 + i), sized("b", 10), sized("a", 50)]))
            .collect();
        for r in reqs {
            r.await.unwrap().await.unwrap().unwrap();
        }
    });
    assert_eq!(outbox.stats().state_bytes, counted_state(&outbox));
    outbox.shutdown_blocking();
}

#[test]
fn an_older_store_counts_its_state_once_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path(), 1 << 20, WhenFull::Reject);
    let outbox = Outbox::open(&o).unwrap();
    let rt = rt();
    for i in 0..10 {
        rt.block_on(outbox.append(vec![sized(&format!("k{i}"), 100 * i)]))
            .unwrap();
    }
    let before = outbox.stats().state_bytes;
    assert!(before > 0);
    outbox.shutdown_blocking();
    drop(outbox);
    // As an earlier version left it: no `state_bytes`.
    {
        let db = Database::create(&o.path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META).unwrap().remove("state_bytes").unwrap();
        txn.commit().unwrap();
    }
    let outbox = Outbox::open(&o).unwrap();
    assert_eq!(outbox.stats().state_bytes, before);
    outbox.shutdown_blocking();
}

#[test]
fn bytes_written_ride_along_with_commits_made_anyway_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path(), 1 << 20, WhenFull::Reject);
    let rt = rt();
    let outbox = Outbox::open(&o).unwrap();
    let commits = outbox.commits();
    assert_eq!(outbox.note_written(1_000), 1_000);
    // A process total never goes back: a late, lower note changes nothing.
    assert_eq!(outbox.note_written(900), 1_000);
    assert_eq!(outbox.commits(), commits, "noting must not commit");
    rt.block_on(outbox.append(vec![change("k", json!(1))]))
        .unwrap();
    outbox.shutdown_blocking();
    drop(outbox);

    // A new process starts at 0 and adds to what the last commit persisted.
    let outbox = Outbox::open(&o).unwrap();
    assert_eq!(outbox.note_written(0), 1_000);
    assert_eq!(outbox.note_written(500), 1_500);
    let read = outbox.read().unwrap();
    assert_eq!(
        Meta::read(&read).unwrap().written_bytes,
        1_000,
        "not before a commit"
    );
    drop(read);
    // The clean stop's last commit carries it.
    outbox.shutdown_blocking();
    drop(outbox);
    let outbox = Outbox::open(&o).unwrap();
    assert_eq!(outbox.note_written(0), 1_500);
    let read = outbox.read().unwrap();
    assert_eq!(Meta::read(&read).unwrap().written_bytes, 1_500);
    drop(read);
    outbox.shutdown_blocking();
    drop(outbox);
}

#[test]
fn a_shadow_watermark_rides_along_without_a_checkpoint() {
    // The aws-iot profile notes a watermark per accepted shadow update: a checkpoint (a
    // durable redb commit) for each would bring back the wear issue 16 removed.
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path(), 1 << 20, WhenFull::Reject);
    let rt = rt();
    let outbox = Outbox::open(&o).unwrap();
    rt.block_on(outbox.append(vec![change("k", json!(1))]))
        .unwrap();
    let epoch = |o: &Outbox| Meta::read(&o.read().unwrap()).unwrap().wal_epoch;
    let before = epoch(&outbox);
    for seq in [5, 3, 7] {
        assert!(shadow::advance(&outbox, "main".into(), seq));
        rt.block_on(outbox.heartbeat()).unwrap();
    }
    assert_eq!(
        epoch(&outbox),
        before,
        "a watermark must not be a checkpoint"
    );
    assert_eq!(shadow::watermark(&outbox, "main"), 7, "raised only");
    // The clean stop's checkpoint makes it durable.
    outbox.shutdown_blocking();
    drop(outbox);
    let outbox = Outbox::open(&o).unwrap();
    assert_eq!(shadow::watermark(&outbox, "main"), 7);
    outbox.shutdown_blocking();
}

// Retention classes (issue 19).

fn class(name: &str, keys: &str, priority: u8) -> crate::config::StoreClass {
    crate::config::StoreClass {
        name: name.into(),
        keys: crate::model::glob::KeyGlob::new(keys).unwrap(),
        priority,
        ttl: None,
        deadband: None,
        dedupe: false,
        max_interval: None,
    }
}

fn at(key: &str, value: serde_json::Value, ts: u64) -> NewChange {
    NewChange {
        ts: Some(ts),
        ..change(key, value)
    }
}

fn counters(o: &Outbox, name: &str) -> class::ClassCounters {
    o.class_stats()
        .into_iter()
        .find(|c| c.name == name)
        .unwrap()
        .counters
}

#[test]
fn deadband_dedupe_and_heartbeat_filter_at_intake_against_the_last_queued_value() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = class("temps", "t.*", 50);
    t.deadband = Some(0.5);
    t.max_interval = Some(Duration::from_secs(60));
    let mut s = class("states", "s.*", 50);
    s.dedupe = true;
    let o =
        Outbox::open_classed(&opts(dir.path(), 1 << 20, WhenFull::DropOldest), &[t, s]).unwrap();
    let rt = rt();
    let t0 = 1_700_000_000_000;
    rt.block_on(async {
        let a = o.append(vec![at("t.1", json!(20.0), t0)]).await.unwrap();
        assert_eq!((a.first_seq, a.last_seq, a.filtered), (1, 1, 0));
        // Within the deadband: not queued, no seq, said in the answer.
        let a = o
            .append(vec![at("t.1", json!(20.3), t0 + 1000)])
            .await
            .unwrap();
        assert_eq!((a.first_seq, a.last_seq, a.filtered), (2, 1, 1));
        // The band is measured from the last QUEUED value (20.0), not the filtered one.
        let a = o
            .append(vec![at("t.1", json!(20.6), t0 + 2000)])
            .await
            .unwrap();
        assert_eq!((a.first_seq, a.filtered), (2, 0));
        // Within one request: each change against the one queued before it.
        let a = o
            .append(vec![
                at("t.2", json!(1), t0),
                at("t.2", json!(1.1), t0),
                at("t.2", json!(5), t0),
            ])
            .await
            .unwrap();
        assert_eq!((a.first_seq, a.last_seq, a.filtered), (3, 4, 1));
        // Acknowledged: the latest reported value still counts as the last queued one.
        o.ack(Ack::Through(4)).await.unwrap();
        let a = o
            .append(vec![at("t.1", json!(20.7), t0 + 30_000)])
            .await
            .unwrap();
        assert_eq!(a.filtered, 1);
        // max_interval after the last queued change (t0 + 2s): a heartbeat is queued.
        let a = o
            .append(vec![at("t.1", json!(20.7), t0 + 62_000)])
            .await
            .unwrap();
        assert_eq!((a.first_seq, a.filtered), (5, 0));
        // Dedupe: equal values only; other classes never filter.
        let a = o
            .append(vec![change("s.1", json!("on")), change("s.1", json!("on"))])
            .await
            .unwrap();
        assert_eq!((a.last_seq - a.first_seq + 1, a.filtered), (1, 1));
        let a = o
            .append(vec![change("x", json!(1)), change("x", json!(1))])
            .await
            .unwrap();
        assert_eq!(a.filtered, 0);
    });
    let c = counters(&o, "temps");
    assert_eq!((c.deadband, c.heartbeat, c.dedupe), (3, 1, 0));
    assert_eq!(counters(&o, "states").dedupe, 1);
    assert_eq!(o.stats().reported, 8);
    assert_eq!(o.reported(Some("t.1")).unwrap()["t.1"].value, json!(20.7));
    o.shutdown_blocking();
}

/// Grows the accounted state in small steps (as desired state would), so that a full
/// store evicts its queued changes one at a time; returns them in the order they went.
fn squeeze(rt: &tokio::runtime::Runtime, o: &Outbox, until_dropped: u64) -> Vec<u64> {
    let mut gone = Vec::new();
    let mut before = all_seqs(o);
    while o.stats().dropped < until_dropped {
        rt.block_on(o.transact(|ctx| ctx.charge_state(0, 100)))
            .unwrap();
        let after = all_seqs(o);
        assert!(after.windows(2).all(|w| w[0] < w[1]));
        gone.extend(before.iter().filter(|s| !after.contains(s)));
        before = after;
    }
    gone
}

#[test]
fn a_full_store_evicts_expired_then_superseded_then_the_oldest_of_the_lowest_class() {
    let dir = tempfile::tempdir().unwrap();
    let mut lo = class("lo", "lo.*", 10);
    lo.ttl = Some(Duration::from_secs(3600));
    let hi = class("hi", "hi.*", 90);
    let o =
        Outbox::open_classed(&opts(dir.path(), 60_000, WhenFull::DropOldest), &[lo, hi]).unwrap();
    let rt = rt();
    let now = now_ms();
    let v = json!("x".repeat(1000));
    // 1 lo.aa (expired) · 2 hi.h1 · 3 dd.00 · 4 lo.bb · 5 dd.00 (supersedes 3) · 6 hi.h2 ·
    // 7 lo.cc; dd.00 is in the default class (priority 50).
    rt.block_on(async {
        for (k, ts) in [
            ("lo.aa", now - 7_200_000),
            ("hi.h1", now),
            ("dd.00", now),
            ("lo.bb", now),
            ("dd.00", now),
            ("hi.h2", now),
            ("lo.cc", now),
        ] {
            o.append(vec![at(k, v.clone(), ts)]).await.unwrap();
        }
    });
    let gone = squeeze(&rt, &o, 7);
    assert_eq!(gone, [1, 3, 4, 7, 5, 2, 6], "the order of eviction");
    let lo = counters(&o, "lo");
    assert_eq!((lo.expired, lo.superseded, lo.oldest), (1, 0, 2));
    let d = counters(&o, "default");
    assert_eq!((d.superseded, d.oldest), (1, 1));
    assert_eq!(counters(&o, "hi").oldest, 2);
    let stats = o.stats();
    assert_eq!((stats.dropped, stats.depth, stats.bytes), (7, 0, 0));
    // An evicted change acknowledged later (it was in flight): a no-op.
    let a = rt.block_on(o.ack(Ack::Seqs(vec![1]))).unwrap();
    assert_eq!(a.changes, 0);
    o.shutdown_blocking();
}

#[test]
fn reject_evicts_only_expired_changes_then_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let mut lo = class("lo", "lo.*", 10);
    lo.ttl = Some(Duration::from_secs(60));
    let o = Outbox::open_classed(&opts(dir.path(), 40_000, WhenFull::Reject), &[lo]).unwrap();
    let rt = rt();
    let now = now_ms();
    let v = json!("x".repeat(1000));
    rt.block_on(async {
        o.append(vec![at("lo.a", v.clone(), now - 120_000)])
            .await
            .unwrap();
        o.append(vec![at("lo.a", v.clone(), now - 120_000)])
            .await
            .unwrap();
        let mut refused = None;
        for i in 0..40 {
            if let Err(e) = o.append(vec![at("lo.b", v.clone(), now + i)]).await {
                refused = Some(e);
                break;
            }
        }
        assert!(
            matches!(refused, Some(StoreError::Full { .. })),
            "{refused:?}"
        );
    });
    // The two expired went (superseded or not), nothing else; then refused.
    let c = counters(&o, "lo");
    assert_eq!((c.expired, c.superseded, c.oldest), (2, 0, 0));
    assert_eq!(o.stats().dropped, 2);
    assert_eq!(o.stats().rejected, 1);
    o.shutdown_blocking();
}

#[test]
fn the_class_index_follows_acks_purges_and_class_changes_across_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path(), 60_000, WhenFull::DropOldest);
    let rt = rt();
    let v = json!("x".repeat(1000));
    let index = |o: &Outbox| {
        let txn = o.read().unwrap();
        let n = txn.open_table(CLASS_QUEUE).map_or(0, |t| t.len().unwrap());
        let s = txn.open_table(SUPERSEDED).map_or(0, |t| t.len().unwrap());
        (n, s)
    };
    let store = Outbox::open_classed(&o, &[class("a", "a.*", 10)]).unwrap();
    rt.block_on(async {
        for _ in 0..5 {
            store
                .append(vec![change("a.1", v.clone()), change("b", v.clone())])
                .await
                .unwrap();
        }
    });
    assert_eq!(index(&store), (10, 8));
    rt.block_on(async { store.ack(Ack::Through(4)).await.unwrap() });
    assert_eq!(index(&store), (6, 4), "acknowledged entries trimmed");
    store.shutdown_blocking();
    drop(store);
    // Other globs: rebuilt from the queue (b is now in class b, the lowest).
    let store = Outbox::open_classed(&o, &[class("b", "b", 5)]).unwrap();
    assert_eq!(index(&store), (6, 4));
    // Superseded first (a.1 5,7; b 6,8), then the oldest of b (10) before the default's 9.
    assert_eq!(squeeze(&rt, &store, 5), [5, 6, 7, 8, 10]);
    store.shutdown_blocking();
    drop(store);
    // No classes: the index goes; the queue is untouched.
    let store = Outbox::open(&o).unwrap();
    assert_eq!(index(&store), (0, 0));
    store.shutdown_blocking();
    drop(store);
    let store = Outbox::open_classed(&o, &[class("b", "b", 5)]).unwrap();
    assert_eq!(index(&store).0, all_seqs(&store).len() as u64);
    rt.block_on(async { store.purge().await.unwrap() });
    assert_eq!(index(&store), (0, 0));
    store.shutdown_blocking();
}
