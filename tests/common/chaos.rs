//! Chaos tests' shared parts (issue #7): a load driver with an independent, fsync'ed ledger
//! of acknowledged changes, a QoS 1 persistent recorder of what reached the broker, and a
//! Jepsen-style checker comparing the two.
//!
//! The ledger is the test's own truth, written by the test process only: a change is in it
//! once the agent answered `ok` for it. A request whose answer never came (the agent was
//! killed, the connection dropped) is "in doubt": it may or may not have been committed, so
//! its changes may be delivered but need not be. Values are unique per change, so a delivered
//! change is matched to its request even without a seq.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use edgesync_testkit::TestPki;
use rumqttc::{Client, Event, Packet};
use serde_json::{Value, json};

use super::cloud::{Subscription, decode, subscriber, tls_options};
use super::{AgentOptions, Conn, Rng};

/// `NAME` from the environment as a number, else `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// The run's seed: `EDGESYNC_CHAOS_SEED`, else from the clock. Printed, so a failure can be
/// replayed (the schedule is seeded; the machine's timing is not).
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("EDGESYNC_CHAOS_SEED")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("{test}: seed {seed} (EDGESYNC_CHAOS_SEED={seed} to replay the schedule)");
    seed
}

/// Agent options for a TLS broker at `port` with the pki's client cert; `mqtt` is further
/// `[mqtt]` lines (keep_alive, reconnect_* must be given here or left at their defaults).
pub fn agent_options(pki: &TestPki, port: u16, mqtt: &str) -> AgentOptions {
    tls_options(pki, port, mqtt).max_bytes("256MiB")
}

/// One change as a (key, value) pair.
type Change = (String, Value);

#[derive(Debug, Default)]
struct LedgerState {
    /// Acknowledged changes by seq.
    acked: BTreeMap<u64, Change>,
    /// Seqs acknowledged twice (a reused seq): must stay empty.
    reused: Vec<u64>,
    /// Changes of requests whose answer never came, by value.
    in_doubt: HashMap<String, Change>,
    /// Requests refused with an error answer (nothing stored).
    refused: u64,
}

/// The driver's own record of what the agent acknowledged, appended and fsync'ed per answer.
#[derive(Debug)]
pub struct Ledger {
    file: Mutex<File>,
    pub path: PathBuf,
    state: Mutex<LedgerState>,
}

impl Ledger {
    pub fn create(path: &Path) -> Arc<Ledger> {
        Arc::new(Ledger {
            file: Mutex::new(File::create(path).expect("create ledger")),
            path: path.to_owned(),
            state: Mutex::new(LedgerState::default()),
        })
    }

    /// Records an acknowledged request: `changes` got `first..`.
    pub fn ack(&self, first: u64, changes: &[Change]) {
        let mut lines = String::new();
        for (i, (k, v)) in changes.iter().enumerate() {
            lines.push_str(&json!({"seq": first + i as u64, "key": k, "value": v}).to_string());
            lines.push('\n');
        }
        {
            let mut f = self.file.lock().unwrap();
            f.write_all(lines.as_bytes()).expect("append to ledger");
            f.sync_data().expect("fsync ledger");
        }
        let mut s = self.state.lock().unwrap();
        for (i, c) in changes.iter().enumerate() {
            let seq = first + i as u64;
            if s.acked.insert(seq, c.clone()).is_some() {
                s.reused.push(seq);
            }
        }
    }

    fn doubt(&self, changes: &[Change]) {
        let mut s = self.state.lock().unwrap();
        for c in changes {
            s.in_doubt.insert(value_id(&c.1), c.clone());
        }
    }

    fn refused(&self) {
        self.state.lock().unwrap().refused += 1;
    }

    pub fn acked_len(&self) -> usize {
        self.state.lock().unwrap().acked.len()
    }

    pub fn acked_seqs(&self) -> Vec<u64> {
        self.state.lock().unwrap().acked.keys().copied().collect()
    }

    pub fn in_doubt_len(&self) -> usize {
        self.state.lock().unwrap().in_doubt.len()
    }
}

fn value_id(v: &Value) -> String {
    v.to_string()
}

/// Threads reporting changes over the local socket as fast as the agent answers, each on
/// its own connection, reconnecting whenever the agent goes away.
#[derive(Debug)]
pub struct Driver {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    requests: Arc<AtomicU64>,
}

impl Driver {
    pub fn start(socket: &Path, ledger: &Arc<Ledger>, threads: u64, seed: u64) -> Driver {
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let threads = (0..threads)
            .map(|t| {
                let (socket, ledger, stop, requests) = (
                    socket.to_owned(),
                    Arc::clone(ledger),
                    Arc::clone(&stop),
                    Arc::clone(&requests),
                );
                thread::spawn(move || drive(t, &socket, &ledger, &stop, &requests, seed))
            })
            .collect();
        Driver {
            stop,
            threads,
            requests,
        }
    }

    /// Requests answered so far (any answer).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().expect("driver thread");
        }
    }
}

fn drive(
    t: u64,
    socket: &Path,
    ledger: &Ledger,
    stop: &AtomicBool,
    requests: &AtomicU64,
    seed: u64,
) {
    let mut rng = Rng::new(seed ^ (t + 1).wrapping_mul(0x5851_F42D_4C95_7F2D));
    let mut conn: Option<Conn> = None;
    let mut i: u64 = 0;
    while !stop.load(Ordering::SeqCst) {
        let Some(c) = conn.as_mut() else {
            // The agent is restarting: poll for its socket.
            conn = Conn::connect(socket).ok();
            if conn.is_none() {
                thread::sleep(Duration::from_millis(5));
            }
            continue;
        };
        let n = rng.range(1, 8);
        let changes: Vec<Change> = (0..n)
            .map(|_| {
                i += 1;
                // The value is unique in the run: it names its request without a seq.
                (format!("w{t}.k{}", i % 16), json!(format!("{t}:{i}")))
            })
            .collect();
        let req = json!({"op": "report", "changes": changes
            .iter()
            .map(|(k, v)| json!({"key": k, "value": v}))
            .collect::<Vec<_>>()});
        match c.call(&req) {
            Ok(a) if a["ok"] == true => {
                requests.fetch_add(1, Ordering::SeqCst);
                let first = a["first_seq"].as_u64().expect("first_seq");
                let last = a["last_seq"].as_u64().expect("last_seq");
                assert_eq!(last + 1 - first, n, "answer covers the request: {a}");
                ledger.ack(first, &changes);
            }
            Ok(a) => {
                requests.fetch_add(1, Ordering::SeqCst);
                eprintln!("driver {t}: request refused: {a}");
                ledger.refused();
            }
            Err(_) => {
                // No answer: committed or not, nobody knows.
                ledger.doubt(&changes);
                conn = None;
            }
        }
    }
}

/// One change as the broker delivered it.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivered {
    pub seq: u64,
    pub key: String,
    pub value: Value,
    pub ts: u64,
}

#[derive(Debug, Default)]
struct RecState {
    changes: Vec<Delivered>,
    seen: HashSet<u64>,
    batches: u64,
    /// Batches the broker delivered with DUP set (its own redelivery to us).
    dup_flag: u64,
    /// Batches not for this device or malformed.
    bad: Vec<String>,
}

impl RecState {
    /// Takes in one batch as the broker delivered it.
    fn record(&mut self, payload: &[u8], dup: bool, device: &str) {
        self.batches += 1;
        if dup {
            self.dup_flag += 1;
        }
        let b = decode(payload);
        if b["device"] != device {
            self.bad.push(format!("batch for another device: {b}"));
        }
        let Some(changes) = b["changes"].as_array() else {
            self.bad.push(format!("batch without changes: {b}"));
            return;
        };
        for c in changes {
            let (Some(seq), Some(key), Some(ts)) =
                (c["seq"].as_u64(), c["key"].as_str(), c["ts"].as_u64())
            else {
                self.bad.push(format!("malformed change: {c}"));
                continue;
            };
            self.seen.insert(seq);
            self.changes.push(Delivered {
                seq,
                key: key.to_owned(),
                value: c["value"].clone(),
                ts,
            });
        }
    }
}

/// A QoS 1 persistent subscriber (clean_session=false) on `P/D/reported` that decodes
/// every batch as it arrives.
pub struct Recorder {
    state: Arc<Mutex<RecState>>,
    ready: Arc<AtomicU64>,
    client: Client,
}

impl Recorder {
    /// Connects directly to the broker at `port` and returns once subscribed.
    pub fn start(pki: &TestPki, port: u16, device: &str) -> Recorder {
        let filter = format!("edgesync/{device}/reported");
        let state = Arc::new(Mutex::new(RecState::default()));
        let (state2, device) = (Arc::clone(&state), device.to_owned());
        let (client, ready) = subscriber(
            pki,
            port,
            &filter,
            Subscription {
                role: "recorder",
                persistent: true,
                suback: Duration::from_secs(30),
            },
            move |ev| {
                if let Event::Incoming(Packet::Publish(p)) = ev {
                    state2.lock().unwrap().record(&p.payload, p.dup, &device);
                }
            },
        );
        Recorder {
            state,
            ready,
            client,
        }
    }

    /// Times the subscription became active (SUBACK or a resumed session).
    pub fn ready_count(&self) -> u64 {
        self.ready.load(Ordering::SeqCst)
    }

    /// Changes received, resends included.
    pub fn received(&self) -> usize {
        self.state.lock().unwrap().changes.len()
    }

    /// Distinct seqs received.
    pub fn distinct(&self) -> usize {
        self.state.lock().unwrap().seen.len()
    }

    /// Batches received with the DUP flag (set by the broker on its redeliveries to us).
    pub fn dup_flagged(&self) -> u64 {
        self.state.lock().unwrap().dup_flag
    }

    /// How many of `seqs` have not arrived.
    pub fn missing(&self, seqs: &[u64]) -> usize {
        let s = self.state.lock().unwrap();
        seqs.iter().filter(|q| !s.seen.contains(q)).count()
    }

    /// Waits until every acknowledged change of `ledger` arrived; fails when nothing new
    /// arrived for `stall`. A soak on a fast machine can queue millions of changes behind its
    /// outages, and the drain after the last one takes as long as it takes: only a drain
    /// that stops is a failure (a fixed deadline failed the 100-outage soak mid-drain).
    pub fn wait_for_ledger(&self, ledger: &Ledger, stall: Duration) {
        let want = ledger.acked_seqs();
        let mut last = usize::MAX;
        let mut since = Instant::now();
        loop {
            let missing = self.missing(&want);
            if missing == 0 {
                return;
            }
            if missing < last {
                last = missing;
                since = Instant::now();
            }
            assert!(
                since.elapsed() < stall,
                "{missing} of {} acknowledged changes never arrived (none for {stall:?})",
                want.len()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn delivered(&self) -> Vec<Delivered> {
        self.state.lock().unwrap().changes.clone()
    }

    pub fn bad(&self) -> Vec<String> {
        self.state.lock().unwrap().bad.clone()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let _ = self.client.disconnect();
    }
}

/// What the checker found; `assert_ok` fails on any violation.
#[derive(Debug, Default)]
pub struct Verdict {
    pub acked: usize,
    pub in_doubt: usize,
    pub refused: u64,
    /// Changes received (resends included) and distinct seqs.
    pub received: usize,
    pub distinct: usize,
    /// Received more than once (identical each time).
    pub duplicates: usize,
    /// Delivered changes of requests whose answer was lost.
    pub in_doubt_delivered: usize,
    /// Acknowledged, never delivered.
    pub lost: Vec<u64>,
    /// Delivered, matching neither an acknowledged change nor an in-doubt request.
    pub unexpected: Vec<String>,
    /// The same seq with different contents (delivered twice, or delivered vs acknowledged).
    pub mismatched: Vec<String>,
    /// A new seq arriving after a higher one had arrived.
    pub out_of_order: Vec<String>,
    pub reused: Vec<u64>,
    pub malformed: Vec<String>,
}

impl Verdict {
    pub fn assert_ok(&self) {
        let ok = self.lost.is_empty()
            && self.unexpected.is_empty()
            && self.mismatched.is_empty()
            && self.out_of_order.is_empty()
            && self.reused.is_empty()
            && self.malformed.is_empty();
        assert!(
            ok,
            "checker found violations: lost {} (e.g. {:?}), unexpected {} (e.g. {:?}), mismatched {} (e.g. {:?}), out of order {} (e.g. {:?}), reused seqs {:?}, malformed {:?}",
            self.lost.len(),
            &self.lost[..self.lost.len().min(5)],
            self.unexpected.len(),
            &self.unexpected[..self.unexpected.len().min(5)],
            self.mismatched.len(),
            &self.mismatched[..self.mismatched.len().min(5)],
            self.out_of_order.len(),
            &self.out_of_order[..self.out_of_order.len().min(5)],
            self.reused,
            &self.malformed[..self.malformed.len().min(5)],
        );
    }

    pub fn summary(&self) -> String {
        format!(
            "acknowledged {}, in doubt {} (delivered {}), refused {}, received {} (distinct {}, duplicates {}), lost {}, unexpected {}, mismatched {}, out of order {}",
            self.acked,
            self.in_doubt,
            self.in_doubt_delivered,
            self.refused,
            self.received,
            self.distinct,
            self.duplicates,
            self.lost.len(),
            self.unexpected.len(),
            self.mismatched.len(),
            self.out_of_order.len()
        )
    }
}

/// Compares what the broker delivered with the ledger.
pub fn check(ledger: &Ledger, rec: &Recorder) -> Verdict {
    let s = ledger.state.lock().unwrap();
    let delivered = rec.delivered();
    let mut v = Verdict {
        acked: s.acked.len(),
        in_doubt: s.in_doubt.len(),
        refused: s.refused,
        received: delivered.len(),
        reused: s.reused.clone(),
        malformed: rec.bad(),
        ..Verdict::default()
    };
    let mut first: HashMap<u64, &Delivered> = HashMap::new();
    let mut max_seen = 0u64;
    for d in &delivered {
        if let Some(prev) = first.get(&d.seq) {
            v.duplicates += 1;
            if *prev != d {
                v.mismatched
                    .push(format!("seq {} delivered as {prev:?} and {d:?}", d.seq));
            }
            continue;
        }
        first.insert(d.seq, d);
        if d.seq < max_seen {
            v.out_of_order
                .push(format!("seq {} first arrived after seq {max_seen}", d.seq));
        }
        max_seen = max_seen.max(d.seq);
        match s.acked.get(&d.seq) {
            Some((k, val)) => {
                if *k != d.key || *val != d.value {
                    v.mismatched.push(format!(
                        "seq {} acknowledged as {k}={val}, delivered as {}={}",
                        d.seq, d.key, d.value
                    ));
                }
            }
            None => match s.in_doubt.get(&value_id(&d.value)) {
                Some((k, _)) if *k == d.key => v.in_doubt_delivered += 1,
                _ => v
                    .unexpected
                    .push(format!("seq {} {}={}", d.seq, d.key, d.value)),
            },
        }
    }
    v.distinct = first.len();
    v.lost = s
        .acked
        .keys()
        .filter(|q| !first.contains_key(q))
        .copied()
        .collect();
    v
}

/// utime + stime of process `pid`, in clock ticks (`/proc/PID/stat` fields 14 and 15).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    // The command name may hold spaces: fields are counted after its closing parenthesis.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime 15.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux).
pub fn clk_tck() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}
