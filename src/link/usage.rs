//! Data usage (`edgesync estimate`, docs/DEPLOY.md "Data usage"): bytes on the wire per
//! change, measured by encoding a sample with the real batch codec, and a month of them.
//!
//! The wire model counts what a metered (cellular) plan bills, IP packets: the payload, the
//! MQTT PUBLISH and PUBACK, TLS 1.3 records (22 bytes each: header, content type, AEAD tag,
//! at most 16 KiB of data), TCP/IPv4 headers with timestamps (52 bytes a segment of at most
//! 1,448 bytes, a delayed ACK every second segment), keep-alive pings while idle. Not
//! counted: TLS handshakes (a few KB at each connection), DNS, resends after a reconnect,
//! desired state and commands.

use std::time::Duration;

use crate::config::{Compression, Encoding};
use crate::link::codec::BatchBuilder;
use crate::model::change::encode_value;
use crate::store::Queued;
use crate::store::record;

/// A month, as the estimate counts it: 30 days.
pub const MONTH: Duration = Duration::from_secs(30 * 86_400);

const TLS_RECORD: u64 = 22;
const TLS_MAX_RECORD: u64 = 16_384;
const TCP_IP: u64 = 52;
const MSS: u64 = 1_448;

/// The numeric sensor sample: `n` changes over `keys` keys (`site.line{n}.pump{n}.{metric}`),
/// floats with two decimals and integer counters, timestamps ~100 ms apart. Deterministic.
pub fn sensor_sample(n: usize, keys: usize) -> Vec<Queued> {
    const METRICS: [&str; 5] = ["temperature", "pressure", "flow", "rpm", "count"];
    let keys = keys.max(1);
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut level: Vec<f64> = (0..keys).map(|k| 20.0 + k as f64).collect();
    let mut ts = 1_764_150_000_000_u64;
    (0..n)
        .filter_map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let k = i % keys;
            ts += 50 + x % 100;
            let key = format!(
                "site.line{}.pump{}.{}",
                k / 50,
                (k / 5) % 10,
                METRICS[k % 5]
            );
            let lv = level.get_mut(k)?;
            let value = if k % 5 >= 3 {
                *lv += (x % 7) as f64;
                serde_json::json!(*lv as u64)
            } else {
                *lv += ((x >> 8) % 21) as f64 / 100.0 - 0.1;
                serde_json::json!((*lv * 100.0).round() / 100.0)
            };
            let v = encode_value(&key, &value).ok()?;
            Some(Queued {
                seq: 1_000_000 + i as u64,
                record: record::encode(ts, &key, &v),
            })
        })
        .collect()
}

/// Payload bytes of `sample` packed into batches of at most `batch` changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packed {
    pub changes: u64,
    pub batches: u64,
    /// The batches before compression.
    pub plain: u64,
    /// What is sent (compressed where smaller).
    pub sent: u64,
    /// Bytes on the wire ([`wire_bytes`]) for all the batches.
    pub wire: u64,
}

impl Packed {
    pub fn per_change(&self, bytes: u64) -> f64 {
        bytes as f64 / self.changes.max(1) as f64
    }
}

/// Packs `sample` as the engine would (in order, at most `batch` changes and `max_bytes`
/// bytes a batch) with `encoding` and `compression`.
pub fn pack(
    sample: &[Queued],
    encoding: Encoding,
    compression: Compression,
    device: &str,
    topic_len: usize,
    batch: usize,
    max_bytes: usize,
) -> Packed {
    let mut b = BatchBuilder::new(encoding, device, batch, max_bytes);
    let mut p = Packed {
        changes: 0,
        batches: 0,
        plain: 0,
        sent: 0,
        wire: 0,
    };
    let mut add = |batch: crate::link::codec::Batch| {
        let sent = compression.apply(batch.payload.clone());
        p.changes += batch.changes;
        p.batches += 1;
        p.plain += batch.payload.len() as u64;
        p.sent += sent.len() as u64;
        p.wire += wire_bytes(sent.len() as u64, topic_len as u64);
    };
    let mut rest = sample;
    while let Some((q, tail)) = rest.split_first() {
        match b.push(q) {
            Ok(true) => rest = tail,
            Ok(false) => match b.finish() {
                Some(batch) => add(batch),
                None => rest = tail,
            },
            // Not in a sample built from valid changes; skipped like a damaged record.
            Err(_) => rest = tail,
        }
    }
    if let Some(batch) = b.finish() {
        add(batch);
    }
    p
}

/// The uncompressed batch document of `changes` (all in one batch).
pub fn batch_payload(changes: &[Queued], encoding: Encoding, device: &str) -> Vec<u8> {
    let mut b = BatchBuilder::new(encoding, device, changes.len(), usize::MAX);
    for q in changes {
        let _ = b.push(q);
    }
    b.finish().map(|b| b.payload).unwrap_or_default()
}

/// Bytes on the wire, both ways, for one QoS 1 PUBLISH of `payload` bytes on a topic of
/// `topic_len` bytes and its PUBACK.
pub fn wire_bytes(payload: u64, topic_len: u64) -> u64 {
    // The broker's ACKs; the PUBACK in its own record and segment, and the device's ACK of it.
    publish_bytes(payload + 2, topic_len) + 4 + TLS_RECORD + TCP_IP + TCP_IP
}

/// A PUBLISH without packet id (QoS 0, as metrics are) and the broker's ACKs.
fn publish_bytes(payload: u64, topic_len: u64) -> u64 {
    let remaining = 2 + topic_len + payload;
    let varint = match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    let mqtt = 1 + varint + remaining;
    let tls = mqtt + TLS_RECORD * mqtt.div_ceil(TLS_MAX_RECORD);
    let segments = tls.div_ceil(MSS);
    tls + TCP_IP * segments + TCP_IP * segments.div_ceil(2)
}

/// One keep-alive exchange: PINGREQ and PINGRESP (2 bytes each in a record and a segment)
/// and the ACK of the response.
pub const PING_BYTES: u64 = 2 * (2 + TLS_RECORD + TCP_IP) + TCP_IP;

/// Keep-alive pings in `cycle` with one publish each `cycle` (none when a publish comes
/// more often than the keep-alive).
pub fn pings_per_cycle(cycle: Duration, keep_alive: Duration) -> u64 {
    if keep_alive.is_zero() || cycle <= keep_alive {
        return 0;
    }
    (cycle.as_secs_f64() / keep_alive.as_secs_f64()).ceil() as u64 - 1
}

/// A metrics document as the agent publishes it (`P/D/metrics`), in bytes: 720 measured on a
/// running agent (`status --json`, `.metrics`, compact), plus room for rates and larger
/// counters; it varies a little with them.
pub const METRICS_BYTES: u64 = 750;

/// What to estimate: `keys` keys changing every `every`; a deadband skips `skip_percent` of
/// the changes; `spread`: each key is reported on its own (batches then gather what
/// `sync.linger` collects), else a cycle's changes are reported together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub keys: u64,
    pub every: Duration,
    pub skip_percent: u8,
    pub spread: bool,
}

/// One row of the estimate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Row {
    pub compression: Compression,
    pub skip_percent: u8,
    pub payload_per_change: f64,
    pub wire_per_change: f64,
    /// Changes a batch holds in this plan.
    pub batch: u64,
    /// Bytes a month on the wire for the changes (batches and PUBACKs).
    pub changes_per_month: f64,
}

/// The estimate of a plan under a config.
#[derive(Debug, Clone, PartialEq)]
pub struct Estimate {
    pub changes_per_month: f64,
    pub rows: Vec<Row>,
    /// Metrics documents and keep-alive pings, a month.
    pub metrics_per_month: f64,
    pub pings_per_month: f64,
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64().max(1e-3)
}

/// Estimates `plan` under `config` (its encoding, batch limits, linger, keep-alive,
/// telemetry interval and the topics of its profile).
pub fn estimate(config: &crate::config::Config, plan: &Plan) -> Estimate {
    use crate::link::profile::{Outbound, Profile};
    let profile = Profile::of(config);
    let s = &config.sync;
    let max_bytes = usize::try_from(s.batch_max_bytes).unwrap_or(usize::MAX);
    let cycles = secs(MONTH) / secs(plan.every);
    let mut rows = Vec::new();
    let mut idle = plan.every;
    for skip in [0, plan.skip_percent] {
        let per_cycle = plan.keys as f64 * f64::from(100 - skip.min(99)) / 100.0;
        let batch = if plan.spread {
            1.0 + per_cycle / secs(plan.every) * s.linger.as_secs_f64()
        } else {
            per_cycle.ceil()
        };
        let batch = (batch as u64).clamp(1, s.batch_max_changes as u64);
        let sample = sensor_sample(batch as usize, plan.keys.clamp(1, 10_000) as usize);
        for compression in [Compression::None, Compression::Gzip] {
            let topic = profile
                .outbound(Outbound::Batch, compression.apply(vec![0xa2]))
                .topic;
            let p = pack(
                &sample,
                s.encoding,
                compression,
                config.device.id.as_str(),
                topic.len(),
                batch as usize,
                max_bytes,
            );
            rows.push(Row {
                compression,
                skip_percent: skip,
                payload_per_change: p.per_change(p.sent),
                wire_per_change: p.per_change(p.wire),
                batch,
                changes_per_month: p.per_change(p.wire) * per_cycle * cycles,
            });
        }
        if skip == 0 {
            // Time between publishes: a batch a cycle, or `batch` changes' worth.
            idle = plan
                .every
                .mul_f64((batch as f64 / per_cycle.max(1e-9)).min(1.0));
        }
        if plan.skip_percent == 0 {
            break;
        }
    }
    let metrics = config.telemetry.interval.map_or(0.0, |i| {
        let topic = profile.outbound(Outbound::Metrics, b"{}".to_vec()).topic;
        secs(MONTH) / secs(i) * publish_bytes(METRICS_BYTES, topic.len() as u64) as f64
    });
    if let Some(i) = config.telemetry.interval {
        idle = idle.min(i);
    }
    let pings = secs(MONTH) / secs(idle)
        * pings_per_cycle(idle, config.mqtt.keep_alive) as f64
        * PING_BYTES as f64;
    Estimate {
        changes_per_month: plan.keys as f64 * cycles,
        rows,
        metrics_per_month: metrics,
        pings_per_month: pings,
    }
}

/// `n` with thousands separators, rounded.
fn grouped(n: f64) -> String {
    let digits = format!("{:.0}", n.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Megabytes (10^6 bytes, as plans count them).
fn mb(bytes: f64) -> String {
    format!("{:.1}", bytes / 1e6)
}

/// The text `edgesync estimate` prints.
pub fn render(config: &crate::config::Config, plan: &Plan, e: &Estimate) -> String {
    use std::fmt::Write as _;
    let s = &config.sync;
    let enc = match s.encoding {
        Encoding::Cbor => "cbor",
        Encoding::Json => "json",
    };
    let mut o = String::new();
    let every = crate::model::text::human_duration(plan.every.as_millis() as u64);
    let _ = writeln!(
        o,
        "{} key{} every {every}: {} changes a month (30 days), numeric sensor values",
        plan.keys,
        if plan.keys == 1 { "" } else { "s" },
        grouped(e.changes_per_month)
    );
    let how = if plan.spread {
        "each key reported on its own, gathered by sync.linger"
    } else {
        "a cycle's changes reported together"
    };
    let _ = writeln!(
        o,
        "sync.encoding {enc}, sync.compression {} (configured), {how}",
        s.compression.name()
    );
    let _ = writeln!(
        o,
        "\n{:<28}{:>7}{:>15}{:>15}{:>12}",
        "", "batch", "payload B/chg", "wire B/chg", "MB/month"
    );
    for r in &e.rows {
        let mut label = format!("compression {}", r.compression.name());
        if r.skip_percent > 0 {
            let _ = write!(label, ", skip {}%", r.skip_percent);
        }
        let mark = if r.compression == s.compression && r.skip_percent == 0 {
            "  <- this config"
        } else {
            ""
        };
        let _ = writeln!(
            o,
            "{label:<28}{:>7}{:>15.1}{:>15.1}{:>12}{mark}",
            r.batch,
            r.payload_per_change,
            r.wire_per_change,
            mb(r.changes_per_month)
        );
    }
    if plan.skip_percent > 0 {
        let _ = writeln!(
            o,
            "skip {}%: a deadband (or dedupe) skips {} of 100 changes",
            plan.skip_percent, plan.skip_percent
        );
    }
    let _ = writeln!(
        o,
        "\nplus, whatever the changes: metrics (telemetry.interval) {} MB/month, keep-alive pings {} MB/month",
        mb(e.metrics_per_month),
        mb(e.pings_per_month)
    );
    o.push_str(
        "wire: payload, MQTT, TLS 1.3 records, TCP/IPv4 headers and ACKs; not counted: TLS\n\
         handshakes (a few KB a connection), resends after a reconnect, desired state, commands.\n\
         Bytes per change measured on a sample packed by the agent's own codec; your keys and\n\
         values may differ (docs/DEPLOY.md, \"Data usage\").\n",
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_bytes_grow_with_records_and_segments() {
        // 100 bytes on a 20-byte topic: 126 MQTT bytes (1 + 1 + 2 + 20 + 2 + 100), one
        // record, one segment and its ACK; the PUBACK and its ACK.
        let small = wire_bytes(100, 20);
        assert_eq!(small, 126 + 22 + 52 + 52 + (4 + 22 + 52) + 52);
        let big = wire_bytes(60_000, 20);
        assert!(big > 60_000 + 4 * 22 + 42 * 52, "{big}");
        assert!(big < 60_000 * 11 / 10, "about 6 % over the payload: {big}");
    }

    #[test]
    fn pings_only_when_idle_for_a_keep_alive() {
        let s = Duration::from_secs;
        assert_eq!(pings_per_cycle(s(10), s(60)), 0);
        assert_eq!(pings_per_cycle(s(60), s(60)), 0);
        assert_eq!(pings_per_cycle(s(300), s(60)), 4);
        assert_eq!(pings_per_cycle(s(90), s(60)), 1);
    }

    #[test]
    fn gzip_sends_at_most_40_percent_of_a_1000_change_sensor_batch() {
        let sample = sensor_sample(1000, 100);
        for enc in [Encoding::Json, Encoding::Cbor] {
            let none = pack(&sample, enc, Compression::None, "d", 20, 1000, 1 << 20);
            let gzip = pack(&sample, enc, Compression::Gzip, "d", 20, 1000, 1 << 20);
            assert_eq!((none.changes, none.batches), (1000, 1));
            assert_eq!(none.plain, gzip.plain);
            assert_eq!(none.sent, none.plain);
            assert!(gzip.sent * 100 <= gzip.plain * 40, "{enc:?}: {gzip:?}");
            assert!(gzip.wire < none.wire);
        }
    }

    fn config(extra: &str) -> crate::config::Config {
        let text = format!(
            "[device]\nid = \"pump-1\"\n[mqtt]\nurl = \"mqtt://localhost:1883\"\n\
             allow_plaintext = true\n{extra}"
        );
        crate::config::Config::from_toml_str(std::path::Path::new("/x.toml"), &text).unwrap()
    }

    #[test]
    fn estimate_counts_changes_batches_and_the_fixed_costs() {
        let c = config("[sync]\ncompression = \"gzip\"\n");
        let plan = Plan {
            keys: 100,
            every: Duration::from_secs(10),
            skip_percent: 50,
            spread: false,
        };
        let e = estimate(&c, &plan);
        assert_eq!(e.changes_per_month, 100.0 * 259_200.0);
        assert_eq!(e.rows.len(), 4);
        let (none, gzip, none50, gzip50) = (e.rows[0], e.rows[1], e.rows[2], e.rows[3]);
        assert_eq!((none.batch, none50.batch), (100, 50));
        assert!(
            gzip.changes_per_month < none.changes_per_month * 0.6,
            "{e:?}"
        );
        assert!(none50.changes_per_month < none.changes_per_month * 0.6);
        assert!(gzip50.changes_per_month < gzip.changes_per_month);
        // A publish every 10 s: no pings with the 30 s keep-alive.
        assert_eq!(e.pings_per_month, 0.0);
        assert!(e.metrics_per_month > 43_200.0 * METRICS_BYTES as f64);
        let text = render(&c, &plan, &e);
        assert!(
            text.contains("compression gzip") && text.contains("<- this config"),
            "{text}"
        );
        assert!(text.contains("25,920,000 changes a month"), "{text}");
    }

    #[test]
    fn one_key_a_day_pays_for_pings_and_metrics() {
        let c = config("[telemetry]\ninterval = \"0\"\n");
        let plan = Plan {
            keys: 1,
            every: Duration::from_secs(86_400),
            skip_percent: 0,
            spread: true,
        };
        let e = estimate(&c, &plan);
        assert_eq!(e.rows.len(), 2);
        assert_eq!(e.metrics_per_month, 0.0);
        assert_eq!(e.rows[0].batch, 1);
        // 2,879 pings a day with the default 30 s keep-alive.
        assert_eq!(c.mqtt.keep_alive, Duration::from_secs(30));
        assert_eq!(e.pings_per_month, 30.0 * 2879.0 * PING_BYTES as f64);
        assert!(e.pings_per_month > 100.0 * e.rows[0].changes_per_month);
    }

    #[test]
    fn one_change_batches_are_not_compressed() {
        let sample = sensor_sample(10, 10);
        let p = pack(
            &sample,
            Encoding::Cbor,
            Compression::Gzip,
            "d",
            20,
            1,
            1 << 20,
        );
        assert_eq!((p.batches, p.sent), (10, p.plain));
    }
}
