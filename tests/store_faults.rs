//! Power cuts and I/O faults under the store (issue #7, parts 2 and 3).
//!
//! The real outbox writer runs its workload (appends, group commits, acks, a transaction
//! with its own table as the desired state uses) on [`SimDisk`], a redb `StorageBackend`
//! that keeps what reached the disk apart from what is only written. A power cut at sync
//! `k` leaves the durable bytes plus some of the writes issued since the last sync; the
//! image is written to a real file and opened with `Outbox::open`, as at the next boot.
//! I/O faults fail the n-th write or sync with EIO or ENOSPC. The full disk is also tried
//! for real: a small tmpfs under the agent binary.
//!
//! `EDGESYNC_FULL_SWEEP=1` sweeps every cut, variant and fault point; the default (CI) run
//! takes a stride through them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgesync::{Ack, Appended, Outbox, RECORD_OVERHEAD, StoreError, StoreOptions, WhenFull};
use edgesync::{NewChange, Origin, encode_value};
use redb::{StorageBackend, TableDefinition};
use serde_json::{Value, json};

/// A table of the caller's own, written in `transact` like the desired state's.
const OWN: TableDefinition<&str, u64> = TableDefinition::new("fault_test_own");

fn full_sweep() -> bool {
    std::env::var_os("EDGESYNC_FULL_SWEEP").is_some_and(|v| v == "1")
}

// ---------------------------------------------------------------------------------------
// The simulated disk

#[derive(Debug, Clone)]
enum Pending {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FaultOp {
    Write,
    Sync,
}

#[derive(Debug, Clone, Copy)]
struct Fault {
    op: FaultOp,
    /// 1-based index of the failing call, counted from when the fault was armed.
    nth: u64,
    errno: i32,
    /// Every later call of that kind fails too, until cleared (a full disk).
    sticky: bool,
}

/// One file of the disk.
#[derive(Debug, Default, Clone)]
struct FileState {
    /// The file as the process sees it (page cache).
    live: Vec<u8>,
    /// What a completed sync made durable.
    durable: Vec<u8>,
    /// Changes since the last completed sync, in order.
    pending: Vec<Pending>,
}

/// The disk: the store file and its journal (`PATH.journal`), one power supply, one
/// count of syncs and one fault plan for both.
#[derive(Debug, Default)]
struct DiskState {
    files: [FileState; 2],
    syncs: u64,
    /// Power is cut when sync number `cut_at` starts.
    cut_at: Option<u64>,
    /// After the cut: the images (store, journal) the disk may hold; every call fails.
    cut_images: Option<Vec<Image>>,
    fault: Option<Fault>,
    writes_since_arm: u64,
    syncs_since_arm: u64,
    faults_hit: u64,
}

/// What the disk may hold after a cut: a name, the store file and the journal.
type Image = (String, Vec<u8>, Vec<u8>);

fn apply(image: &mut Vec<u8>, op: &Pending) {
    match op {
        Pending::SetLen(len) => image.resize(*len as usize, 0),
        Pending::Write(offset, data) => {
            let off = *offset as usize;
            if image.len() < off + data.len() {
                image.resize(off + data.len(), 0);
            }
            image[off..off + data.len()].copy_from_slice(data);
        }
    }
}

impl FileState {
    /// What the file may hold after a cut now: writes since the last sync reach it in
    /// order, all, some or none of them, and the last one may be torn.
    fn images(&self) -> Vec<(&'static str, Vec<u8>)> {
        let with = |n: usize| {
            let mut img = self.durable.clone();
            for op in &self.pending[..n] {
                apply(&mut img, op);
            }
            img
        };
        let n = self.pending.len();
        let mut out = vec![("lost", with(0))];
        if n >= 2 {
            out.push(("half", with(n / 2)));
        }
        if let Some(Pending::Write(off, data)) = self.pending.last() {
            let mut img = with(n - 1);
            apply(
                &mut img,
                &Pending::Write(*off, data[..data.len() / 2].to_vec()),
            );
            out.push(("torn-last", img));
        }
        if n >= 1 {
            out.push(("all", with(n)));
        }
        // Identical images need one check only.
        let mut seen = BTreeSet::new();
        out.retain(|(_, img)| seen.insert(img.clone()));
        out
    }
}

impl DiskState {
    /// Every combination of what each file may hold.
    fn images(&self) -> Vec<Image> {
        let mut out = Vec::new();
        for (sv, store) in self.files[0].images() {
            for (jv, journal) in self.files[1].images() {
                out.push((format!("store {sv}, journal {jv}"), store.clone(), journal));
            }
        }
        out
    }

    fn dead(&self) -> bool {
        self.cut_images.is_some()
    }
}

/// A redb backend over memory with power cuts and injected errors; clones share the disk.
/// `SimDisk(_, 0)` is the store file, [`SimDisk::journal`] its journal.
#[derive(Debug, Clone, Default)]
struct SimDisk(Arc<Mutex<DiskState>>, usize);

fn power_off() -> std::io::Error {
    std::io::Error::other("simulated power cut")
}

impl SimDisk {
    fn from_images(store: &[u8], journal: &[u8]) -> SimDisk {
        let d = SimDisk::default();
        {
            let mut s = d.0.lock().unwrap();
            for (f, img) in s.files.iter_mut().zip([store, journal]) {
                f.live = img.to_vec();
                f.durable = img.to_vec();
            }
        }
        d
    }

    /// The journal's file on the same disk.
    fn journal(&self) -> SimDisk {
        SimDisk(Arc::clone(&self.0), 1)
    }

    /// Opens the store on this disk, with its journal.
    fn open(&self, o: &StoreOptions) -> Result<Outbox, StoreError> {
        Outbox::open_with_backends(self.clone(), self.journal(), o)
    }

    fn cut_at(&self, sync: u64) {
        self.0.lock().unwrap().cut_at = Some(sync);
    }

    fn syncs(&self) -> u64 {
        self.0.lock().unwrap().syncs
    }

    fn cut_images(&self) -> Option<Vec<Image>> {
        self.0.lock().unwrap().cut_images.clone()
    }

    fn arm(&self, fault: Fault) {
        let mut s = self.0.lock().unwrap();
        s.fault = Some(fault);
        s.writes_since_arm = 0;
        s.syncs_since_arm = 0;
    }

    fn clear_fault(&self) {
        self.0.lock().unwrap().fault = None;
    }

    fn faults_hit(&self) -> u64 {
        self.0.lock().unwrap().faults_hit
    }

    fn counts(&self) -> (u64, u64) {
        let s = self.0.lock().unwrap();
        (s.writes_since_arm, s.syncs_since_arm)
    }

    /// The files after a clean shutdown: everything written.
    fn live(&self) -> (Vec<u8>, Vec<u8>) {
        let s = self.0.lock().unwrap();
        (s.files[0].live.clone(), s.files[1].live.clone())
    }

    fn inject(s: &mut DiskState, op: FaultOp) -> Result<(), std::io::Error> {
        let n = match op {
            FaultOp::Write => {
                s.writes_since_arm += 1;
                s.writes_since_arm
            }
            FaultOp::Sync => {
                s.syncs_since_arm += 1;
                s.syncs_since_arm
            }
        };
        if let Some(f) = s.fault
            && f.op == op
            && (n == f.nth || (f.sticky && n > f.nth))
        {
            s.faults_hit += 1;
            return Err(std::io::Error::from_raw_os_error(f.errno));
        }
        Ok(())
    }
}

impl StorageBackend for SimDisk {
    fn len(&self) -> Result<u64, std::io::Error> {
        let s = self.0.lock().unwrap();
        if s.dead() {
            return Err(power_off());
        }
        Ok(s.files[self.1].live.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        let s = self.0.lock().unwrap();
        if s.dead() {
            return Err(power_off());
        }
        let off = offset as usize;
        let Some(src) = s.files[self.1].live.get(off..off + out.len()) else {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        };
        out.copy_from_slice(src);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        let mut s = self.0.lock().unwrap();
        if s.dead() {
            return Err(power_off());
        }
        // Growing a file allocates on write (sparse), so a full disk fails the writes.
        let f = &mut s.files[self.1];
        f.live.resize(len as usize, 0);
        f.pending.push(Pending::SetLen(len));
        Ok(())
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        let mut s = self.0.lock().unwrap();
        if s.dead() {
            return Err(power_off());
        }
        s.syncs += 1;
        if s.cut_at == Some(s.syncs) {
            s.cut_images = Some(s.images());
            return Err(power_off());
        }
        // A failed fsync: nothing is known to be durable (what Linux does with the dirty
        // pages is the limit stated in the docs).
        Self::inject(&mut s, FaultOp::Sync)?;
        let f = &mut s.files[self.1];
        f.durable = f.live.clone();
        f.pending.clear();
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        let mut s = self.0.lock().unwrap();
        if s.dead() {
            return Err(power_off());
        }
        Self::inject(&mut s, FaultOp::Write)?;
        let f = &mut s.files[self.1];
        apply(&mut f.live, &Pending::Write(offset, data.to_vec()));
        f.pending.push(Pending::Write(offset, data.to_vec()));
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// The workload and what it was told

/// Everything the workload was acknowledged, to check a recovered store against.
#[derive(Debug, Default, Clone)]
struct Ledger {
    /// seq → (key, value) of every acknowledged append.
    appended: BTreeMap<u64, (String, Vec<u8>)>,
    /// Seqs whose deletion (ack) was acknowledged.
    deleted: BTreeSet<u64>,
    /// Seqs of acks that failed: a failed commit may still have reached the disk.
    maybe_deleted: BTreeSet<u64>,
    /// The `OWN` value of the last acknowledged transaction.
    own: Option<u64>,
    /// Highest seq any caller was ever given.
    max_seq: u64,
    /// Error codes callers got.
    errors: Vec<StoreError>,
    /// Records handed over before their fsync.
    handed: u64,
}

fn change(key: &str, value: Value) -> NewChange {
    NewChange {
        key: key.into(),
        value: encode_value(key, &value).unwrap(),
        ts: None,
        origin: Origin::Device,
    }
}

impl Ledger {
    /// Records an append's answer; true if it failed for another reason than `max_bytes`.
    fn appended(&mut self, changes: &[NewChange], r: Result<Appended, StoreError>) -> bool {
        match r {
            Ok(a) => {
                assert_eq!(a.last_seq + 1 - a.first_seq, changes.len() as u64);
                for (c, seq) in changes.iter().zip(a.first_seq..) {
                    self.appended.insert(seq, (c.key.clone(), c.value.clone()));
                }
                self.max_seq = self.max_seq.max(a.last_seq);
                false
            }
            Err(e) => {
                let failed = !matches!(e, StoreError::Full { .. } | StoreError::StateFull { .. });
                self.errors.push(e);
                failed
            }
        }
    }
}

/// How far the workload goes; `rounds` of a few commits each.
#[derive(Debug, Clone, Copy)]
struct Plan {
    rounds: u64,
    when_full: WhenFull,
    max_bytes: u64,
    /// Stop at the first error (a power cut) or go on (I/O faults).
    stop_on_error: bool,
    /// A listener takes every commit's records before its fsync, as the online sync
    /// engine does: the seqs it was handed count as given out and must never be reused.
    tail: bool,
}

fn store_opts(path: &Path, plan: &Plan) -> StoreOptions {
    StoreOptions {
        path: path.to_path_buf(),
        max_bytes: plan.max_bytes,
        when_full: plan.when_full,
        cache_size: 1 << 20,
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// [`workload_steps`], with the records handed over before each fsync (if the plan says so)
/// counted as given out.
async fn workload(outbox: &Outbox, plan: &Plan, ledger: &mut Ledger) {
    let mut tail = plan.tail.then(|| outbox.tail());
    workload_steps(outbox, plan, ledger).await;
    while let Some(records) = tail.as_mut().and_then(|t| t.try_recv().ok()) {
        for q in records {
            ledger.handed += 1;
            ledger.max_seq = ledger.max_seq.max(q.seq);
        }
    }
}

/// The agent's kinds of commit, round after round: single and grouped appends (some large,
/// so `max_bytes` is reached), a transaction writing its own table with an append, range
/// and through acks.
async fn workload_steps(outbox: &Outbox, plan: &Plan, ledger: &mut Ledger) {
    for i in 0..plan.rounds {
        let mut failed = false;
        let one = vec![
            change(&format!("k{}", i % 3), json!(i)),
            // One key: latest values count against max_bytes too; the queue is what fills.
            change("big", json!("x".repeat(200 * (i as usize % 4)))),
        ];
        let r = outbox.append(one.clone()).await;
        failed |= ledger.appended(&one, r);
        if failed && plan.stop_on_error {
            return;
        }
        // Three requests at once: usually one group commit.
        let reqs: Vec<Vec<NewChange>> = (0..3)
            .map(|j| vec![change(&format!("g{j}"), json!({"round": i, "j": j}))])
            .collect();
        let mut pending = Vec::new();
        for r in &reqs {
            pending.push(outbox.submit(r.clone()).await);
        }
        for (r, p) in reqs.iter().zip(pending) {
            let res = match p {
                Ok(rx) => rx.await.unwrap_or(Err(StoreError::Closed)),
                Err(e) => Err(e),
            };
            failed |= ledger.appended(r, res);
        }
        if failed && plan.stop_on_error {
            return;
        }
        let c = vec![NewChange {
            origin: Origin::Cloud,
            ..change("desired.led", json!(i))
        }];
        let c2 = c.clone();
        let r = outbox
            .transact(move |ctx| {
                ctx.txn.open_table(OWN)?.insert("v", i)?;
                ctx.append(&c2)
            })
            .await;
        match r {
            Ok(inner) => {
                ledger.own = Some(i);
                ledger.appended(&c, inner);
            }
            Err(e) => {
                failed = true;
                ledger.errors.push(e);
            }
        }
        if failed && plan.stop_on_error {
            return;
        }
        if i % 2 == 1 {
            // The engine acks what it sent: here the two oldest queued changes.
            let queued = outbox.read_from(0, 2, usize::MAX);
            if let Ok(q) = queued
                && let (Some(first), Some(last)) = (q.first(), q.last())
            {
                let (first, last) = (first.seq, last.seq);
                match outbox.ack(Ack::Range { first, last }).await {
                    Ok(_) => ledger.deleted.extend(first..=last),
                    Err(e) => {
                        ledger.maybe_deleted.extend(first..=last);
                        failed = true;
                        ledger.errors.push(e);
                    }
                }
            }
        }
        if i == plan.rounds / 2 {
            let through = ledger.max_seq.saturating_sub(6);
            match outbox.ack(Ack::Through(through)).await {
                Ok(_) => ledger.deleted.extend(1..=through),
                Err(e) => {
                    ledger.maybe_deleted.extend(1..=through);
                    failed = true;
                    ledger.errors.push(e);
                }
            }
        }
        if failed && plan.stop_on_error {
            return;
        }
    }
}

/// Checks a store against what its callers were told; `ledger` is extended by one more
/// append, which must get a seq never given before.
fn check_invariants(outbox: &Outbox, plan: &Plan, ledger: &mut Ledger, what: &str) {
    let rows = outbox.read_from(0, usize::MAX, usize::MAX).unwrap();
    let seqs: Vec<u64> = rows.iter().map(|q| q.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{what}: {seqs:?}");
    let stats = outbox.stats();
    assert_eq!(stats.depth, rows.len() as u64, "{what}: depth");
    let bytes: u64 = rows
        .iter()
        .map(|q| q.record.len() as u64 + RECORD_OVERHEAD)
        .sum();
    assert_eq!(stats.bytes, bytes, "{what}: bytes");
    assert_eq!(
        stats.reported - stats.acked - stats.dropped,
        stats.depth,
        "{what}: counters {stats:?}"
    );
    let max_row = seqs.last().copied().unwrap_or(0);
    assert!(stats.next_seq > max_row, "{what}: {stats:?} vs {max_row}");
    assert!(
        stats.next_seq > ledger.max_seq,
        "{what}: next_seq {} would reuse acknowledged seq {}",
        stats.next_seq,
        ledger.max_seq
    );
    let present: HashMap<u64, &[u8]> = rows.iter().map(|q| (q.seq, &q.record[..])).collect();
    let min_row = seqs.first().copied().unwrap_or(u64::MAX);
    let mut evicted = 0;
    let mut back = 0;
    for (seq, (key, value)) in &ledger.appended {
        if ledger.deleted.contains(seq) {
            // An acknowledgement is durable with the next journal record or checkpoint: a
            // crash before it sends that change again (at least once), a bounded number.
            if let Some(rec) = present.get(seq) {
                let r = edgesync::codec::record::decode(rec).unwrap();
                assert_eq!(
                    (r.key, r.value),
                    (key.as_str(), &value[..]),
                    "{what}: seq {seq}"
                );
                back += 1;
            }
            continue;
        }
        match present.get(seq) {
            Some(rec) => {
                let r = edgesync::codec::record::decode(rec).unwrap();
                assert_eq!(
                    (r.key, r.value),
                    (key.as_str(), &value[..]),
                    "{what}: seq {seq}"
                );
            }
            None if ledger.maybe_deleted.contains(seq) => {}
            // drop-oldest evicts from the front, counted.
            None if plan.when_full == WhenFull::DropOldest && *seq < min_row => evicted += 1,
            None => panic!("{what}: acknowledged seq {seq} ({key}) lost; rows {seqs:?}"),
        }
    }
    assert!(
        stats.dropped >= evicted,
        "{what}: {evicted} gone, {stats:?}"
    );
    assert!(
        back <= edgesync::ACK_SYNC,
        "{what}: {back} acknowledged changes back, more than ACK_SYNC"
    );
    // The latest reported value is at least as new as the last acknowledged change.
    let mut newest: HashMap<&str, u64> = HashMap::new();
    for (seq, (key, _)) in &ledger.appended {
        newest.insert(key, *seq);
    }
    for (key, seq) in newest {
        let (got, _) = outbox
            .reported_raw(key)
            .unwrap()
            .unwrap_or_else(|| panic!("{what}: reported {key} missing"));
        assert!(got >= seq, "{what}: reported {key} at {got} < {seq}");
    }
    if let Some(own) = ledger.own {
        let txn = outbox.read().unwrap();
        let v = txn
            .open_table(OWN)
            .unwrap()
            .get("v")
            .unwrap()
            .unwrap()
            .value();
        assert!(v >= own, "{what}: own table {v} < acknowledged {own}");
    }
    // Seqs are never reused: a new append goes past everything ever handed out.
    let a = rt()
        .block_on(outbox.append(vec![change("after", json!(1))]))
        .unwrap_or_else(|e| panic!("{what}: append after recovery: {e}"));
    assert!(a.first_seq > ledger.max_seq.max(max_row), "{what}: {a:?}");
    ledger.max_seq = a.last_seq;
    ledger.appended.insert(
        a.first_seq,
        ("after".into(), encode_value("after", &json!(1)).unwrap()),
    );
}

/// A directory for the store files of a sweep, in memory when possible (many fsyncs).
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(d) = tempfile::tempdir_in(shm)
    {
        return d;
    }
    tempfile::tempdir().unwrap()
}

/// Opens a crash image (the store file and its journal) as the next boot would (the real
/// file paths) and checks it.
fn boot_image(dir: &Path, image: &[u8], journal: &[u8], plan: &Plan, ledger: &Ledger, what: &str) {
    let path: PathBuf = dir.join("store.redb");
    let _ = std::fs::remove_file(&path);
    let mut aside = path.clone().into_os_string();
    aside.push(".incomplete");
    let _ = std::fs::remove_file(&aside);
    std::fs::write(&path, image).unwrap();
    std::fs::write(edgesync::journal_path(&path), journal).unwrap();
    // redb's own check first, on a copy (an image of an unfinished creation is no redb
    // file yet: the store sets it aside).
    if bootable(image) {
        let mut db = redb::Database::builder()
            .create_with_backend(SimDisk::from_images(image, &[]))
            .unwrap_or_else(|e| panic!("{what}: redb cannot open the image: {e}"));
        db.check_integrity()
            .unwrap_or_else(|e| panic!("{what}: integrity: {e}"));
    }
    let outbox = Outbox::open(&store_opts(&path, plan))
        .unwrap_or_else(|e| panic!("{what}: store does not open after the cut: {e}"));
    let mut ledger = ledger.clone();
    check_invariants(&outbox, plan, &mut ledger, what);
    outbox.shutdown_blocking();
}

/// Whether redb's creation of the image completed (its magic number is written).
fn bootable(image: &[u8]) -> bool {
    image.len() >= 9 && image.iter().take(9).any(|b| *b != 0)
}

/// Runs the workload on a fresh disk cut at sync `cut` (none if 0); returns the disk, the
/// ledger and whether the store's first open succeeded.
fn run_cut(plan: &Plan, cut: u64) -> (SimDisk, Ledger, bool) {
    let disk = SimDisk::default();
    if cut > 0 {
        disk.cut_at(cut);
    }
    let mut ledger = Ledger::default();
    let o = store_opts(Path::new("sim.redb"), plan);
    let Ok(outbox) = disk.open(&o) else {
        return (disk, ledger, false);
    };
    rt().block_on(workload(&outbox, plan, &mut ledger));
    outbox.shutdown_blocking();
    (disk, ledger, true)
}

/// Cuts power at every sync of the workload (a stride of them in CI), boots each image,
/// and cuts again during recovery of some.
fn sweep(plan: Plan, second_every: u64) -> (u64, u64, u64) {
    let (probe, ledger, opened) = run_cut(&plan, 0);
    assert!(opened, "the probe run failed to open");
    assert!(
        ledger
            .errors
            .iter()
            .all(|e| matches!(e, StoreError::Full { .. } | StoreError::StateFull { .. })),
        "{:?}",
        ledger.errors
    );
    assert!(
        !plan.tail || ledger.handed > 0,
        "the listener was handed nothing"
    );
    let total = probe.syncs();
    let dir = scratch();
    let (mut cuts, mut images, mut second) = (0, 0, 0);
    // A margin past the probe: group commits may batch differently run to run.
    for cut in 1..=total + 2 {
        let (disk, ledger, _) = run_cut(&plan, cut);
        let Some(imgs) = disk.cut_images() else {
            continue;
        };
        cuts += 1;
        for (variant, image, journal) in &imgs {
            images += 1;
            let what = format!("{plan:?} cut at sync {cut}/{total} ({variant})");
            boot_image(dir.path(), image, journal, &plan, &ledger, &what);
            // A second cut while the first recovery runs.
            if second_every > 0 && cut % second_every == 0 && bootable(image) {
                second += second_cuts(dir.path(), (image, journal), &plan, &ledger, &what);
            }
        }
    }
    (cuts, images, second)
}

/// Replays the recovery of `image` (open + one append), cutting at each of its syncs.
fn second_cuts(
    dir: &Path,
    (image, journal): (&[u8], &[u8]),
    plan: &Plan,
    ledger: &Ledger,
    what: &str,
) -> u64 {
    let o = store_opts(Path::new("sim.redb"), plan);
    let recover = |disk: &SimDisk, ledger: &mut Ledger| {
        if let Ok(outbox) = disk.open(&o) {
            let c = vec![change("recovery", json!(true))];
            let r = rt().block_on(outbox.append(c.clone()));
            ledger.appended(&c, r);
            outbox.shutdown_blocking();
        }
    };
    let probe = SimDisk::from_images(image, journal);
    recover(&probe, &mut ledger.clone());
    let syncs = probe.syncs();
    let stride = if full_sweep() { 1 } else { 2 };
    let mut n = 0;
    for j in (1..=syncs).step_by(stride) {
        let disk = SimDisk::from_images(image, journal);
        disk.cut_at(j);
        let mut l = ledger.clone();
        recover(&disk, &mut l);
        let Some(imgs) = disk.cut_images() else {
            continue;
        };
        for (variant, img2, journal2) in imgs {
            n += 1;
            let what = format!("{what}, then again at recovery sync {j}/{syncs} ({variant})");
            boot_image(dir, &img2, &journal2, plan, &l, &what);
        }
    }
    n
}

#[test]
fn power_cut_at_every_sync_point_loses_nothing_acknowledged() {
    let full = full_sweep();
    let mut report = Vec::new();
    for (when_full, max_bytes, tail) in [
        (WhenFull::Reject, 4096, false),
        (WhenFull::DropOldest, 4096, false),
        (WhenFull::DropOldest, 4096, true),
    ] {
        let plan = Plan {
            rounds: if full { 12 } else { 6 },
            when_full,
            max_bytes,
            stop_on_error: true,
            tail,
        };
        let started = Instant::now();
        let (cuts, images, second) = sweep(plan, if full { 1 } else { 8 });
        report.push(format!(
            "{when_full:?} (tail {tail}): {cuts} cut points, {images} images booted, {second} second cuts, {:.1?}",
            started.elapsed()
        ));
        // A backend that stopped seeing syncs would pass with nothing cut: the sweep must
        // have cut, booted and cut again (docs/RELIABILITY.md §2: 32-33 cut points and over
        // a hundred second cuts per policy in CI).
        assert!(
            cuts >= 20 && images >= cuts && second >= 20,
            "{when_full:?} (tail {tail}): too little was cut: {cuts} cut points, {images} images, {second} second cuts"
        );
    }
    eprintln!("power-cut sweep (full={full}):\n  {}", report.join("\n  "));
}

#[test]
fn power_cut_while_the_store_file_is_created_leaves_a_usable_store() {
    // Regression: the image left by a cut during creation (before redb wrote its magic
    // number) was refused as corrupt at every start, forever.
    let plan = Plan {
        rounds: 0,
        when_full: WhenFull::Reject,
        max_bytes: 1 << 20,
        stop_on_error: true,
        tail: false,
    };
    let (probe, _, _) = run_cut(&plan, 0);
    let creation_syncs = probe.syncs();
    assert!(creation_syncs > 0);
    let dir = scratch();
    let mut set_aside = 0;
    for cut in 1..=creation_syncs {
        let (disk, _, _) = run_cut(&plan, cut);
        for (variant, image, _) in disk.cut_images().unwrap_or_default() {
            let what = format!("creation cut at sync {cut}/{creation_syncs} ({variant})");
            let path = dir.path().join("store.redb");
            let aside = dir.path().join("store.redb.incomplete");
            let _ = std::fs::remove_file(&aside);
            std::fs::write(&path, &image).unwrap();
            let outbox =
                Outbox::open(&store_opts(&path, &plan)).unwrap_or_else(|e| panic!("{what}: {e}"));
            let mut ledger = Ledger::default();
            check_invariants(&outbox, &plan, &mut ledger, &what);
            outbox.shutdown_blocking();
            if !image.is_empty() && image.iter().take(9).all(|b| *b == 0) {
                set_aside += 1;
                assert_eq!(std::fs::read(&aside).unwrap(), image, "{what}: kept aside");
            }
        }
    }
    eprintln!("creation: {creation_syncs} syncs, {set_aside} images set aside");
    assert!(
        set_aside > 0,
        "no cut left a file without magic: the regression is not exercised"
    );
}

// ---------------------------------------------------------------------------------------
// I/O errors

const EIO: i32 = 5;
const ENOSPC: i32 = 28;
const EDQUOT: i32 = 122;

/// Runs the workload with the n-th write or sync failing; checks the answers, then that
/// the store recovers once the fault is cleared, live and after a restart.
fn fault_run(plan: &Plan, fault: Fault) -> bool {
    fault_run_within(plan, fault, Duration::from_secs(60))
}

/// [`fault_run`], failing if the store has not recovered `within` the fault's clearing.
fn fault_run_within(plan: &Plan, fault: Fault, within: Duration) -> bool {
    let disk = SimDisk::default();
    let o = store_opts(Path::new("sim.redb"), plan);
    let outbox = disk.open(&o).unwrap();
    disk.arm(fault);
    let mut ledger = Ledger::default();
    let rt = rt();
    rt.block_on(workload(&outbox, plan, &mut ledger));
    let hit = disk.faults_hit() > 0;
    let what = format!("{plan:?} {fault:?}");
    let want = if fault.errno == EIO {
        "io-error"
    } else {
        "store-full"
    };
    for e in &ledger.errors {
        let ok =
            e.code() == want || matches!(e, StoreError::Full { .. } | StoreError::StateFull { .. });
        assert!(ok, "{what}: answered {} ({e})", e.code());
    }
    disk.clear_fault();
    // Space returns: the writer reopens the store by itself (backoff up to 2 s).
    let deadline = Instant::now() + within;
    loop {
        match rt.block_on(outbox.append(vec![change("probe", json!(1))])) {
            Ok(a) => {
                ledger.max_seq = ledger.max_seq.max(a.last_seq);
                ledger.appended.insert(
                    a.first_seq,
                    ("probe".into(), encode_value("probe", &json!(1)).unwrap()),
                );
                break;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "{what}: never recovered: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    check_invariants(&outbox, plan, &mut ledger, &format!("{what}, live"));
    outbox.shutdown_blocking();
    drop(outbox);
    let (store, journal) = disk.live();
    let restarted = SimDisk::from_images(&store, &journal).open(&o).unwrap();
    check_invariants(&restarted, plan, &mut ledger, &format!("{what}, restarted"));
    restarted.shutdown_blocking();
    hit
}

#[test]
fn io_errors_and_full_disk_fail_only_their_commit_and_the_store_recovers() {
    let full = full_sweep();
    let plan = Plan {
        rounds: 6,
        when_full: WhenFull::Reject,
        max_bytes: 4096,
        stop_on_error: false,
        tail: true,
    };
    // How many writes and syncs the workload makes.
    let disk = SimDisk::default();
    let o = store_opts(Path::new("sim.redb"), &plan);
    let outbox = disk.open(&o).unwrap();
    disk.arm(Fault {
        op: FaultOp::Write,
        nth: u64::MAX,
        errno: EIO,
        sticky: false,
    });
    rt().block_on(workload(&outbox, &plan, &mut Ledger::default()));
    outbox.shutdown_blocking();
    let (writes, syncs) = disk.counts();
    // Syncs are few (one or two a commit): all of them even in CI.
    let write_stride = if full { 1 } else { 7 };
    let mut report = Vec::new();
    for (errno, sticky) in [(EIO, false), (ENOSPC, true), (EDQUOT, true)] {
        for (op, total) in [(FaultOp::Write, writes), (FaultOp::Sync, syncs)] {
            let started = Instant::now();
            let (mut points, mut hit) = (0, 0);
            let stride = if op == FaultOp::Sync { 1 } else { write_stride };
            let mut nth = 1;
            while nth <= total {
                points += 1;
                hit += u64::from(fault_run(
                    &plan,
                    Fault {
                        op,
                        nth,
                        errno,
                        sticky,
                    },
                ));
                nth += stride;
            }
            report.push(format!(
                "errno {errno} on {op:?}: {points} fault points ({hit} hit) of {total}, {:.1?}",
                started.elapsed()
            ));
            // A fault that was never hit tested nothing. The points are counted on a probe
            // run; group commits differ run to run, so the last few may lie past the end.
            assert!(
                points > 0 && hit * 4 >= points * 3,
                "errno {errno} on {op:?}: {hit} of {points} fault points hit ({total} in the workload)"
            );
        }
    }
    eprintln!("I/O fault sweep (full={full}):\n  {}", report.join("\n  "));
}

/// One EIO on a write: that commit fails, redb is reopened (backoff from 50 ms) and the
/// store works again within seconds, live and after a restart. The sweep above covers every
/// write; this is the quick check (`.ci/mutants`: "no reopen after an I/O error").
#[test]
fn after_an_io_error_the_store_is_reopened_and_works_again_within_seconds() {
    let plan = Plan {
        rounds: 2,
        when_full: WhenFull::Reject,
        max_bytes: 4096,
        stop_on_error: false,
        tail: true,
    };
    let fault = Fault {
        op: FaultOp::Write,
        nth: 3,
        errno: EIO,
        sticky: false,
    };
    assert!(
        fault_run_within(&plan, fault, Duration::from_secs(10)),
        "the fault was never hit"
    );
}

// ---------------------------------------------------------------------------------------
// A full file system under the real agent

#[test]
fn full_disk_under_the_real_agent_answers_store_full_and_recovers() {
    use common::{Agent, AgentOptions, error_code, report_req, wait_until};
    let mut agent = Agent::prepare(
        AgentOptions::default()
            .max_bytes("256MiB")
            .store_path("fs/store.redb"),
    );
    // Declared after the agent: unmounted before the agent's directory goes.
    let Some((_mount, ballast)) = common::half_full_store_fs(&agent) else {
        return;
    };
    agent.launch();

    // key → value of every acknowledged change, and its seq.
    let mut acked: BTreeMap<String, (u64, Value)> = BTreeMap::new();
    let record =
        |acked: &mut BTreeMap<String, (u64, Value)>, ans: &Value, changes: &[(String, Value)]| {
            let first = ans["first_seq"].as_u64().unwrap();
            assert_eq!(
                ans["last_seq"].as_u64().unwrap() + 1 - first,
                changes.len() as u64
            );
            for ((k, v), seq) in changes.iter().zip(first..) {
                assert!(acked.insert(k.clone(), (seq, v.clone())).is_none());
            }
        };
    let value = |n: usize| json!(format!("{n:08}{}", "x".repeat(2000)));
    let batch = |n: usize| -> Vec<(String, Value)> {
        (0..8)
            .map(|j| (format!("c{n}.{j}"), value(n * 8 + j)))
            .collect()
    };
    let req = |changes: &[(String, Value)]| {
        report_req(changes.iter().map(|(k, v)| (k.as_str(), v.clone())))
    };

    // Fill the file system through the agent.
    let mut full_at = None;
    for n in 0..1000 {
        let changes = batch(n);
        let ans = agent.request(&req(&changes));
        if ans["ok"] == true {
            record(&mut acked, &ans, &changes);
        } else {
            assert_eq!(error_code(&ans), "store-full", "{ans}");
            full_at = Some(n);
            break;
        }
    }
    let full_at = full_at.expect("the 2 MiB file system never filled up");
    assert!(!acked.is_empty(), "nothing fitted before the disk was full");

    // The CLI exits 4 on it. A small commit may still fit in pages redb already holds, so
    // large ones, until one needs new space.
    let mut cli_full = false;
    for i in 0..50 {
        let key = format!("cli{i}");
        let big = "b".repeat(60_000);
        let out = agent.cli(&["report", &format!("{key}={big}")]);
        match out.status.code() {
            Some(0) => {
                // Acknowledged: its seq is unknown here, so checked by key below.
                acked.insert(key, (0, json!(big)));
            }
            Some(4) => {
                assert!(
                    common::stderr(&out).contains("store"),
                    "{}",
                    common::stderr(&out)
                );
                cli_full = true;
                break;
            }
            other => panic!("report exited {other:?}: {}", common::stderr(&out)),
        }
    }
    assert!(cli_full, "edgesync report never exited 4 on a full disk");
    assert!(agent.is_running(), "the agent died on a full disk");
    let status = agent.status();
    // A failed commit is not acknowledged, but may have been complete on disk.
    let depth = status["queue"]["depth"].as_u64().unwrap();
    assert!(depth >= acked.len() as u64, "{status}");

    // A crash and a restart while the disk is still full: the store opens (nothing to
    // write on open) and keeps answering store-full.
    agent.kill9();
    agent.restart();
    // Repair may have freed pages that failed commits held: some reports may fit again.
    let mut n = full_at;
    loop {
        assert!(
            n < full_at + 100,
            "the disk never filled again after the restart"
        );
        let changes = batch(n);
        n += 1;
        let ans = agent.request(&req(&changes));
        if ans["ok"] == true {
            record(&mut acked, &ans, &changes);
            continue;
        }
        assert_eq!(error_code(&ans), "store-full", "{ans}");
        break;
    }

    // Space returns: the agent takes reports again by itself.
    std::fs::remove_file(&ballast).unwrap();
    wait_until(
        "a report accepted after space returned",
        Duration::from_secs(60),
        || {
            let changes = batch(n);
            let ans = agent.request(&req(&changes));
            n += 1;
            if ans["ok"] == true {
                record(&mut acked, &ans, &changes);
                return true;
            }
            assert_eq!(error_code(&ans), "store-full", "{ans}");
            false
        },
    );
    for _ in 0..5 {
        let changes = batch(n);
        n += 1;
        let ans = agent.request(&req(&changes));
        assert_eq!(ans["ok"], true, "{ans}");
        record(&mut acked, &ans, &changes);
    }
    assert!(agent.is_running());
    agent.stop();
    let log = agent.log();
    assert!(!log.contains("panicked"), "{log}");

    // Everything acknowledged is in the store, seqs unique and increasing.
    let stored = agent.read_store();
    assert!(stored.windows(2).all(|w| w[0].seq < w[1].seq));
    let by_key: HashMap<&str, (u64, &Value)> = stored
        .iter()
        .map(|c| (c.key.as_str(), (c.seq, &c.value)))
        .collect();
    for (key, (seq, value)) in &acked {
        let (got_seq, got) = by_key
            .get(key.as_str())
            .unwrap_or_else(|| panic!("acknowledged {key} missing from the store"));
        assert_eq!(*got, value, "{key}");
        if *seq != 0 {
            assert_eq!(*got_seq, *seq, "{key}");
        }
    }
    eprintln!(
        "full disk: {} changes acknowledged, full after {full_at} requests, {} in store",
        acked.len(),
        stored.len()
    );
}

/// After a power cut, acknowledged changes come back (to be sent again) only while their
/// deletion was not durable yet: fewer than `ACK_SYNC`, whatever the number acknowledged.
#[test]
fn a_power_cut_sends_fewer_than_ack_sync_acknowledged_changes_again() {
    let plan = Plan {
        rounds: 0,
        when_full: WhenFull::DropOldest,
        max_bytes: 1 << 30,
        stop_on_error: true,
        tail: false,
    };
    let disk = SimDisk::default();
    let o = store_opts(Path::new("sim.redb"), &plan);
    let outbox = disk.open(&o).unwrap();
    let rt = rt();
    let mut ledger = Ledger::default();
    let total = 3 * edgesync::ACK_SYNC + 100;
    rt.block_on(async {
        // A backlog, then each change acknowledged on its own: acknowledgements alone
        // write nothing until ACK_SYNC of them wait.
        let mut seqs = Vec::new();
        for i in 0..total {
            let c = vec![change("k", json!(i))];
            let a = outbox.append(c.clone()).await;
            ledger.appended(&c, a.clone());
            seqs.push(a.unwrap().first_seq);
        }
        for seq in seqs {
            outbox.ack(Ack::Seqs(vec![seq])).await.unwrap();
            ledger.deleted.insert(seq);
        }
    });
    // The power goes at the next sync: a report after the last acknowledgements.
    disk.cut_at(disk.syncs() + 1);
    let _ = rt.block_on(outbox.append(vec![change("last", json!(1))]));
    let images = disk.cut_images().expect("the cut happened");
    drop(outbox);
    let dir = scratch();
    let mut most = 0;
    for (variant, image, journal) in &images {
        let path = dir.path().join("store.redb");
        std::fs::write(&path, image).unwrap();
        std::fs::write(edgesync::journal_path(&path), journal).unwrap();
        let outbox = Outbox::open(&store_opts(&path, &plan)).unwrap();
        let back = outbox.read_from(0, usize::MAX, usize::MAX).unwrap();
        let back = back
            .iter()
            .filter(|q| ledger.deleted.contains(&q.seq))
            .count() as u64;
        eprintln!("{total} acknowledged one by one, power cut ({variant}): {back} come back");
        assert!(back < edgesync::ACK_SYNC, "{variant}: {back} come back");
        most = most.max(back);
        let mut l = ledger.clone();
        check_invariants(&outbox, &plan, &mut l, variant);
        outbox.shutdown_blocking();
    }
    // Some deletions were not durable yet (those after the last record or checkpoint):
    // the bound is what this shows, not an exact count (checkpoints move the boundary).
    assert!(
        most > 0,
        "no image had a deletion to lose: the bound is not exercised"
    );
}
