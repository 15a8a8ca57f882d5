//! The journal: a small preallocated file beside the store (`PATH.journal`) that makes a
//! small group commit durable with one `fdatasync` of the block or two it wrote, instead of
//! a durable redb commit (7-9 pages of 4 KiB: the copy-on-write B-tree pages of three
//! tables, the table tree, the freed-page tree and the header). Flash wear, issue 16:
//! docs/BENCHMARKS.md "Flash wear".
//!
//! Such a commit is a non-durable redb commit (kept in memory and the page cache) plus a
//! journal record of what it did; a **checkpoint** (a durable redb commit) later persists
//! all of them at once, bumps `meta.wal_epoch` and starts the journal again. A record
//! carries the epoch it follows, so at open the records of the epoch redb holds are the
//! commits since its last checkpoint: they are applied again, in order, to the same state,
//! with the same results. Records of older epochs, torn records (a power cut during the
//! write) and the zeros after the last record fail the check and end the replay.
//!
//! The file is written full of zeros once (its blocks allocated), then overwritten in
//! place from the start after each checkpoint: an `fdatasync` then flushes the data blocks
//! only, no file-system metadata, and the journal never needs more disk space (a full disk
//! cannot fail a journal write). It is written in whole 4 KiB blocks with `O_DIRECT` where
//! the file system allows it: through the page cache, a small write into a file once
//! written in one piece dirties a whole large folio (up to the file: 1 MiB written per
//! record, measured on Linux 6.18 ext4).
//!
//! Acknowledgements alone write nothing: their entries wait in memory ([`ACK_SYNC`] at
//! most) and go out with the next record. A crash loses them, so those changes are sent
//! again (at least once); no later record can depend on them, as it carries them first.
//!
//! [`ACK_SYNC`]: crate::store::ACK_SYNC
//!
//! A record: `len u32 | crc32 u32 | epoch u64 | payload[len]`, little-endian, the CRC-32
//! (IEEE) over epoch and payload. The payload is the commit's effects on the queue,
//! see [`Entry`].

use redb::StorageBackend;

use crate::store::Ack;

/// Bytes of the journal file: a checkpoint comes when it is full, or half full at a commit
/// of acknowledgements alone; the larger, the fewer checkpoints (each about 100 KB).
pub const CAPACITY: u64 = 1 << 20;
/// Reads and the first fill go in pieces of this size (memory at open).
const CHUNK: usize = 64 << 10;
/// A commit whose record would be larger goes through a checkpoint instead (a burst of
/// 1,000 small changes fits: its records take about 60 KB).
pub const RECORD_MAX: usize = 96 << 10;
const HEAD: usize = 16;
/// Writes cover whole blocks of this size, at offsets of it.
pub const BLOCK: usize = 4096;

/// Why [`Journal::open`] failed.
#[derive(Debug)]
pub enum OpenError {
    /// The file could not be made full size (it never held a record).
    Make(std::io::Error),
    /// An existing journal could not be read: its records may be needed.
    Read(std::io::Error),
}

/// The journal's position, to go back to (see [`Journal::rollback`]).
#[derive(Debug)]
pub struct Mark {
    end: u64,
    records: u64,
    changes: u64,
    tail: Vec<u8>,
    pending: Vec<Entry>,
    pending_acks: u64,
}

/// One effect of a commit on the queue, in the order the writer applied it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// Changes queued from `first_seq` on: their outbox records (`ts`, key, value, origin).
    Append {
        first_seq: u64,
        records: Vec<Vec<u8>>,
    },
    /// A request refused whole (`store-full`), `n` changes counted in `rejected`.
    Rejected(u64),
    Ack(Ack),
}

/// A commit's record: where `seq_reserved` stood after it, and its entries.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    pub seq_reserved: u64,
    pub entries: Vec<Entry>,
}

#[derive(Debug)]
pub struct Journal {
    backend: Box<dyn StorageBackend>,
    epoch: u64,
    end: u64,
    /// Records written since the last checkpoint.
    pub records: u64,
    /// Changes queued by them: redb holds their pages in memory until the checkpoint.
    pub changes: u64,
    /// Entries of commits not written yet (acknowledgements), and their changes.
    pending: Vec<Entry>,
    pub pending_acks: u64,
    /// The next write: the bytes of the block `end` is in, up to `end`, then the record.
    buf: Vec<u8>,
    /// Changes of the prepared record.
    prepared_changes: u64,
}

impl Journal {
    /// Opens the journal on `backend` (making it [`CAPACITY`] bytes of zeros if it is
    /// shorter) and returns the records that follow the checkpoint of `epoch`.
    pub fn open(
        backend: Box<dyn StorageBackend>,
        epoch: u64,
    ) -> Result<(Option<Journal>, Vec<Record>), OpenError> {
        let len = backend.len().map_err(OpenError::Read)?;
        if len < CAPACITY {
            let zeros = vec![0u8; CHUNK];
            let mut at = len - len % BLOCK as u64;
            let mut made = Ok(());
            while at < CAPACITY && made.is_ok() {
                let n = usize::try_from(CAPACITY - at).unwrap_or(CHUNK).min(CHUNK);
                made = backend.write(at, &zeros[..n]);
                at += n as u64;
            }
            if let Err(e) = made.and_then(|()| backend.sync_data()) {
                // Give the space back (e.g. a full disk): the store needs it more.
                let _ = backend.set_len(0);
                return Err(OpenError::Make(e));
            }
        }
        let mut journal = Journal {
            backend,
            epoch,
            end: 0,
            records: 0,
            changes: 0,
            pending: Vec::new(),
            pending_acks: 0,
            buf: Vec::new(),
            prepared_changes: 0,
        };
        let records = journal.reread(epoch).map_err(OpenError::Read)?;
        Ok((Some(journal), records))
    }

    /// Reads the records that follow the checkpoint of `epoch` again (after redb was
    /// reopened), and continues after them.
    pub fn reread(&mut self, epoch: u64) -> std::io::Result<Vec<Record>> {
        // In pieces, as far as the records go (usually a few blocks).
        let capacity = usize::try_from(CAPACITY).unwrap_or(usize::MAX);
        let mut data = Vec::new();
        let mut records = Vec::new();
        let mut at = 0usize;
        loop {
            match read_record(&data, at, epoch) {
                Some((record, next)) => {
                    records.push(record);
                    at = next;
                }
                // Incomplete in what is read so far: read on, unless all is read.
                None if data.len() < capacity && needs_more(&data, at) => {
                    let from = data.len();
                    let n = CHUNK.min(capacity - from);
                    data.resize(from + n, 0);
                    self.backend.read(from as u64, &mut data[from..])?;
                }
                None => break,
            }
        }
        self.epoch = epoch;
        self.end = at as u64;
        self.records = records.len() as u64;
        self.changes = records
            .iter()
            .flat_map(|r| &r.entries)
            .map(|e| match e {
                Entry::Append { records, .. } => records.len() as u64,
                _ => 0,
            })
            .sum();
        self.pending.clear();
        self.pending_acks = 0;
        self.buf.clear();
        self.buf.extend_from_slice(&data[at - at % BLOCK..at]);
        Ok(records)
    }

    /// Keeps a commit's entries (acknowledgements) for the next record.
    pub fn defer(&mut self, entries: Vec<Entry>, acked: u64) {
        self.pending.extend(entries);
        self.pending_acks += acked;
    }

    /// The entries waiting for the next record (to apply again after a reopen).
    pub fn take_pending(&mut self) -> Vec<Entry> {
        self.pending_acks = 0;
        std::mem::take(&mut self.pending)
    }

    /// Whether anything is journaled or waiting to be (a checkpoint is then worth it).
    pub fn is_empty(&self) -> bool {
        self.records == 0 && self.pending.is_empty()
    }

    /// Encodes the waiting entries, then `record`'s, as the next record; `false` if it
    /// does not fit (the commit must be a checkpoint instead). Written by [`Self::write`].
    pub fn prepare(&mut self, record: &Record) -> bool {
        let keep = usize::try_from(self.end % BLOCK as u64).unwrap_or(0);
        self.buf.truncate(keep);
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0u8; HEAD]);
        put(&mut self.buf, record.seq_reserved);
        self.prepared_changes = 0;
        for e in self.pending.iter().chain(&record.entries) {
            if let Entry::Append { records, .. } = e {
                self.prepared_changes += records.len() as u64;
            }
            encode_entry(e, &mut self.buf);
        }
        let len = self.buf.len() - at - HEAD;
        if len > RECORD_MAX || self.end + (HEAD + len) as u64 > CAPACITY {
            self.buf.truncate(keep);
            return false;
        }
        self.buf[at..at + 4].copy_from_slice(&(len as u32).to_le_bytes());
        self.buf[at + 8..at + 16].copy_from_slice(&self.epoch.to_le_bytes());
        let crc = crc32(&self.buf[at + 8..]);
        self.buf[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
        true
    }

    /// Writes the prepared record and syncs it: durable on return. The waiting entries it
    /// carries are then written.
    pub fn write(&mut self) -> std::io::Result<()> {
        let keep = self.end % BLOCK as u64;
        let start = self.end - keep;
        let end = start + self.buf.len() as u64;
        // Whole blocks: the rest of the last one zeroed (also ends the replay there).
        let written = self.buf.len();
        self.buf.resize(written.div_ceil(BLOCK) * BLOCK, 0);
        let result = self
            .backend
            .write(start, &self.buf)
            .and_then(|()| self.backend.sync_data());
        self.buf.truncate(written);
        result?;
        self.end = end;
        self.records += 1;
        self.changes += self.prepared_changes;
        self.pending.clear();
        self.pending_acks = 0;
        // The block the next record starts in.
        let tail = usize::try_from(end % BLOCK as u64).unwrap_or(0);
        self.buf.drain(..written - tail);
        Ok(())
    }

    /// After the checkpoint that stored `epoch` in redb: the next record goes to the start.
    /// Nothing is written: the old records carry an older epoch.
    pub fn restart(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.end = 0;
        self.records = 0;
        self.changes = 0;
        self.pending.clear();
        self.pending_acks = 0;
        self.buf.clear();
    }

    /// Where the next record goes, to [`Self::rollback`] to if its commit fails.
    pub fn mark(&self) -> Mark {
        Mark {
            end: self.end,
            records: self.records,
            changes: self.changes,
            tail: self.buf[..usize::try_from(self.end % BLOCK as u64).unwrap_or(0)].to_vec(),
            pending: self.pending.clone(),
            pending_acks: self.pending_acks,
        }
    }

    /// Back to `mark`: the record written since (its commit failed) is overwritten by the
    /// next one, and the entries it carried wait again.
    pub fn rollback(&mut self, mark: Mark) {
        self.end = mark.end;
        self.records = mark.records;
        self.changes = mark.changes;
        self.buf = mark.tail;
        self.pending = mark.pending;
        self.pending_acks = mark.pending_acks;
    }

    /// Bytes of records written since the last checkpoint.
    pub fn used(&self) -> u64 {
        self.end
    }
}

/// Whether the record at `at` may go past what `data` holds (read more before judging).
fn needs_more(data: &[u8], at: usize) -> bool {
    match data.get(at..at + HEAD) {
        None => true,
        Some(head) => {
            let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
            len <= RECORD_MAX && at + HEAD + len > data.len()
        }
    }
}

/// The record at `at` if it is whole and of `epoch`, and where the next one starts.
fn read_record(data: &[u8], at: usize, epoch: u64) -> Option<(Record, usize)> {
    let head = data.get(at..at.checked_add(HEAD)?)?;
    let len = u32::from_le_bytes(head[0..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(head[4..8].try_into().ok()?);
    let rec_epoch = u64::from_le_bytes(head[8..16].try_into().ok()?);
    if len == 0 || len > RECORD_MAX || rec_epoch != epoch {
        return None;
    }
    let end = at.checked_add(HEAD)?.checked_add(len)?;
    let body = data.get(at + 8..end)?;
    if crc32(body) != crc {
        return None;
    }
    let record = decode(&body[8..])?;
    Some((record, end))
}

const APPEND: u8 = 1;
const REJECTED: u8 = 2;
const THROUGH: u8 = 3;
const RANGE: u8 = 4;
const SEQS: u8 = 5;
const CORRUPT: u8 = 6;
const RANGE_SKIPPING: u8 = 7;

fn put(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_seqs(out: &mut Vec<u8>, seqs: &[u64]) {
    put(out, seqs.len() as u64);
    for s in seqs {
        put(out, *s);
    }
}

#[cfg(test)]
pub fn encode(record: &Record, out: &mut Vec<u8>) {
    put(out, record.seq_reserved);
    for e in &record.entries {
        encode_entry(e, out);
    }
}

fn encode_entry(e: &Entry, out: &mut Vec<u8>) {
    match e {
        Entry::Append { first_seq, records } => {
            out.push(APPEND);
            put(out, *first_seq);
            put(out, records.len() as u64);
            for r in records {
                // u32: a record is far below 4 GiB (RECORD_MAX bounds the whole).
                out.extend_from_slice(&(r.len() as u32).to_le_bytes());
                out.extend_from_slice(r);
            }
        }
        Entry::Rejected(n) => {
            out.push(REJECTED);
            put(out, *n);
        }
        Entry::Ack(Ack::Through(n)) => {
            out.push(THROUGH);
            put(out, *n);
        }
        Entry::Ack(Ack::Range { first, last }) => {
            out.push(RANGE);
            put(out, *first);
            put(out, *last);
        }
        Entry::Ack(Ack::Seqs(seqs)) => {
            out.push(SEQS);
            put_seqs(out, seqs);
        }
        Entry::Ack(Ack::Corrupt(seqs)) => {
            out.push(CORRUPT);
            put_seqs(out, seqs);
        }
        Entry::Ack(Ack::RangeSkipping {
            first,
            last,
            corrupt,
        }) => {
            out.push(RANGE_SKIPPING);
            put(out, *first);
            put(out, *last);
            put_seqs(out, corrupt);
        }
    }
}

/// Reads what [`encode`] wrote; `None` if it is not that (a record's CRC matched, so only
/// a bug or another program's file gets here).
pub fn decode(mut data: &[u8]) -> Option<Record> {
    fn take<'a>(data: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (data.get(..n)?, data.get(n..)?);
        *data = rest;
        Some(head)
    }
    fn num(data: &mut &[u8]) -> Option<u64> {
        Some(u64::from_le_bytes(take(data, 8)?.try_into().ok()?))
    }
    fn seqs(data: &mut &[u8]) -> Option<Vec<u64>> {
        let n = usize::try_from(num(data)?).ok()?;
        // Each seq takes 8 bytes: a count beyond what is left is damage.
        if n > data.len() / 8 {
            return None;
        }
        (0..n).map(|_| num(data)).collect()
    }
    let seq_reserved = num(&mut data)?;
    let mut entries = Vec::new();
    while let Some(&tag) = data.first() {
        data = &data[1..];
        entries.push(match tag {
            APPEND => {
                let first_seq = num(&mut data)?;
                let n = usize::try_from(num(&mut data)?).ok()?;
                if n > data.len() / 4 {
                    return None;
                }
                let mut records = Vec::with_capacity(n);
                for _ in 0..n {
                    let len = u32::from_le_bytes(take(&mut data, 4)?.try_into().ok()?);
                    records.push(take(&mut data, len as usize)?.to_vec());
                }
                Entry::Append { first_seq, records }
            }
            REJECTED => Entry::Rejected(num(&mut data)?),
            THROUGH => Entry::Ack(Ack::Through(num(&mut data)?)),
            RANGE => Entry::Ack(Ack::Range {
                first: num(&mut data)?,
                last: num(&mut data)?,
            }),
            SEQS => Entry::Ack(Ack::Seqs(seqs(&mut data)?)),
            CORRUPT => Entry::Ack(Ack::Corrupt(seqs(&mut data)?)),
            RANGE_SKIPPING => Entry::Ack(Ack::RangeSkipping {
                first: num(&mut data)?,
                last: num(&mut data)?,
                corrupt: seqs(&mut data)?,
            }),
            _ => return None,
        });
    }
    Some(Record {
        seq_reserved,
        entries,
    })
}

/// CRC-32 (IEEE), bit by bit: records are small, and a table would cost binary size.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// The journal's file (`PATH.journal`, mode 0600 like the store), with `O_DIRECT` where
/// the file system has it (not tmpfs): writes go to the disk as the whole blocks they are.
#[derive(Debug)]
pub struct JournalFile {
    file: std::fs::File,
    direct: bool,
}

impl JournalFile {
    pub fn open(path: &std::path::Path) -> std::io::Result<JournalFile> {
        use std::os::unix::fs::OpenOptionsExt;
        let open = |flags: i32| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(flags)
                .open(path)
        };
        match open(libc::O_DIRECT) {
            Ok(file) => Ok(JournalFile { file, direct: true }),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(JournalFile {
                file: open(0)?,
                direct: false,
            }),
            Err(e) => Err(e),
        }
    }
}

/// A buffer of `len` bytes at a block-aligned address (`O_DIRECT` needs one), without
/// unsafe code: a larger vector and the aligned window into it.
fn aligned(len: usize) -> (Vec<u8>, usize) {
    let buf = vec![0u8; len + BLOCK];
    let at = (BLOCK - buf.as_ptr() as usize % BLOCK) % BLOCK;
    (buf, at)
}

impl StorageBackend for JournalFile {
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        if !self.direct {
            return self.file.read_exact_at(out, offset);
        }
        let start = offset - offset % BLOCK as u64;
        let skip = usize::try_from(offset - start).unwrap_or(0);
        let len = (skip + out.len()).div_ceil(BLOCK) * BLOCK;
        let (mut buf, at) = aligned(len);
        self.file.read_exact_at(&mut buf[at..at + len], start)?;
        out.copy_from_slice(&buf[at + skip..at + skip + out.len()]);
        Ok(())
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.file.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }
    /// `O_DIRECT`: `offset` and `data.len()` are multiples of [`BLOCK`] (the journal's).
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        if !self.direct {
            return self.file.write_all_at(data, offset);
        }
        let (mut buf, at) = aligned(data.len());
        buf[at..at + data.len()].copy_from_slice(data);
        self.file.write_all_at(&buf[at..at + data.len()], offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(b: Box<dyn StorageBackend>, epoch: u64) -> (Journal, Vec<Record>) {
        let (j, r) = Journal::open(b, epoch).unwrap();
        (j.unwrap(), r)
    }

    #[derive(Debug, Clone, Default)]
    struct Mem(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl StorageBackend for Mem {
        fn len(&self) -> std::io::Result<u64> {
            Ok(self.0.lock().unwrap().len() as u64)
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            let d = self.0.lock().unwrap();
            let o = offset as usize;
            out.copy_from_slice(&d[o..o + out.len()]);
            Ok(())
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.0.lock().unwrap().resize(len as usize, 0);
            Ok(())
        }
        fn sync_data(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            let mut d = self.0.lock().unwrap();
            let o = offset as usize;
            if d.len() < o + data.len() {
                d.resize(o + data.len(), 0);
            }
            d[o..o + data.len()].copy_from_slice(data);
            Ok(())
        }
    }

    fn sample(n: u64) -> Record {
        Record {
            seq_reserved: 100 + n,
            entries: vec![
                Entry::Append {
                    first_seq: n,
                    records: vec![vec![1, 2, 3], vec![]],
                },
                Entry::Rejected(2),
                Entry::Ack(Ack::Through(n)),
                Entry::Ack(Ack::Range { first: 1, last: 2 }),
                Entry::Ack(Ack::Seqs(vec![4, 5])),
                Entry::Ack(Ack::Corrupt(vec![6])),
                Entry::Ack(Ack::RangeSkipping {
                    first: 7,
                    last: 9,
                    corrupt: vec![8],
                }),
            ],
        }
    }

    #[test]
    fn crc32_is_the_ieee_one() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn records_round_trip_and_damage_is_refused() {
        let r = sample(7);
        let mut buf = Vec::new();
        encode(&r, &mut buf);
        assert_eq!(decode(&buf), Some(r));
        for cut in 0..buf.len() {
            // A prefix is either refused or a shorter valid record; never a panic.
            let _ = decode(&buf[..cut]);
        }
        buf.push(99);
        assert_eq!(decode(&buf), None);
    }

    #[test]
    fn replay_returns_the_records_of_the_epoch_up_to_a_torn_one() {
        let disk = Mem::default();
        let (mut j, old) = open(Box::new(disk.clone()), 3);
        assert!(old.is_empty());
        assert_eq!(disk.len().unwrap(), CAPACITY);
        for n in 0..3 {
            assert!(j.prepare(&sample(n)));
            j.write().unwrap();
        }
        let (_, got) = open(Box::new(disk.clone()), 3);
        assert_eq!(got, vec![sample(0), sample(1), sample(2)]);
        // Another epoch: nothing to replay.
        let (_, got) = open(Box::new(disk.clone()), 4);
        assert!(got.is_empty());
        // A checkpoint, then one record of the new epoch over the old ones.
        let (mut j, _) = open(Box::new(disk.clone()), 3);
        j.restart(4);
        assert!(j.prepare(&sample(9)));
        j.write().unwrap();
        let (_, got) = open(Box::new(disk.clone()), 4);
        assert_eq!(got, vec![sample(9)]);
        // A torn third record: the first two only.
        let disk = Mem::default();
        let (mut j, _) = open(Box::new(disk.clone()), 1);
        let mut ends = Vec::new();
        for n in 0..3 {
            assert!(j.prepare(&sample(n)));
            j.write().unwrap();
            ends.push(j.used());
        }
        disk.0.lock().unwrap()[ends[2] as usize - 1] ^= 0xff;
        let (_, got) = open(Box::new(disk), 1);
        assert_eq!(got, vec![sample(0), sample(1)]);
    }

    #[test]
    fn a_full_journal_refuses_the_record() {
        let (mut j, _) = open(Box::new(Mem::default()), 1);
        let big = Record {
            seq_reserved: 0,
            entries: vec![Entry::Append {
                first_seq: 1,
                records: vec![vec![0u8; 15_000]],
            }],
        };
        let mut n = 0;
        while j.prepare(&big) {
            j.write().unwrap();
            n += 1;
        }
        assert_eq!(n, 69, "1 MiB holds 69 records of 15 KB");
        let huge = Record {
            seq_reserved: 0,
            entries: vec![Entry::Append {
                first_seq: 1,
                records: vec![vec![0u8; RECORD_MAX]],
            }],
        };
        j.restart(2);
        assert!(!j.prepare(&huge));
    }

    #[test]
    fn writes_are_whole_blocks_and_deferred_acks_go_with_the_next_record() {
        #[derive(Debug, Clone, Default)]
        struct Log(Mem, std::sync::Arc<std::sync::Mutex<Vec<(u64, usize)>>>);
        impl StorageBackend for Log {
            fn len(&self) -> std::io::Result<u64> {
                self.0.len()
            }
            fn read(&self, o: u64, out: &mut [u8]) -> std::io::Result<()> {
                self.0.read(o, out)
            }
            fn set_len(&self, l: u64) -> std::io::Result<()> {
                self.0.set_len(l)
            }
            fn sync_data(&self) -> std::io::Result<()> {
                Ok(())
            }
            fn write(&self, o: u64, d: &[u8]) -> std::io::Result<()> {
                self.1.lock().unwrap().push((o, d.len()));
                self.0.write(o, d)
            }
        }
        let disk = Log::default();
        let (mut j, _) = open(Box::new(disk.clone()), 1);
        disk.1.lock().unwrap().clear();
        j.defer(vec![Entry::Ack(Ack::Through(3))], 3);
        assert_eq!(j.pending_acks, 3);
        assert!(!j.is_empty());
        let append = Record {
            seq_reserved: 9,
            entries: vec![Entry::Append {
                first_seq: 4,
                records: vec![vec![7u8; 5000]],
            }],
        };
        for _ in 0..3 {
            assert!(j.prepare(&append));
            j.write().unwrap();
        }
        assert_eq!(j.pending_acks, 0);
        let writes = disk.1.lock().unwrap().clone();
        assert!(
            writes
                .iter()
                .all(|(o, l)| o % BLOCK as u64 == 0 && l % BLOCK == 0),
            "{writes:?}"
        );
        let (_, got) = open(Box::new(disk.0.clone()), 1);
        let mut first = append.clone();
        first.entries.insert(0, Entry::Ack(Ack::Through(3)));
        assert_eq!(got, vec![first, append.clone(), append]);
    }
}
