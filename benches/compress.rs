//! Batch compression (issue 19): bytes per change of a numeric sensor batch with and without
//! `sync.compression = "gzip"`, the time to compress a batch, and the deflate levels.
//!
//! `cargo bench --bench compress [-- --quick]`
//!
//! In process, no broker: the sample of `edgesync::usage::sensor_sample` (changes over 100
//! keys `site.lineN.pumpN.METRIC`, floats with two decimals and integer counters, `ts` ~100 ms
//! apart) packed by the agent's own batch codec, in batches of 1, 10, 100 and 1,000 changes,
//! JSON and CBOR. "wire" adds what a metered link bills (MQTT, TLS 1.3, TCP/IPv4 and the
//! PUBACK; `edgesync::usage::wire_bytes`). Compress time: the median of many runs of the
//! agent's `gzip` on the batch (the bench profile: opt-level 3; the ship build is opt-level
//! "z").

mod common;

use std::time::Instant;

use edgesync::usage::{gzip, pack, sensor_sample};
use edgesync::{Compression, Encoding};

/// `edgesync/pump-0042/reported`
const TOPIC: usize = 28;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let runs = if quick { 20 } else { 200 };
    print!("{}", common::machine());
    println!(
        "\n{:<5} {:>6} {:>10} {:>10} {:>7} {:>10} {:>10} {:>10} {:>11}",
        "enc",
        "batch",
        "plain B/c",
        "gzip B/c",
        "ratio",
        "wire B/c",
        "gz wire",
        "wire ratio",
        "gzip µs/b"
    );
    for enc in [Encoding::Json, Encoding::Cbor] {
        for batch in [1usize, 10, 100, 1000] {
            let sample = sensor_sample(batch.max(1000), 100);
            let none = pack(
                &sample,
                enc,
                Compression::None,
                "pump-0042",
                TOPIC,
                batch,
                1 << 20,
            );
            let zip = pack(
                &sample,
                enc,
                Compression::Gzip,
                "pump-0042",
                TOPIC,
                batch,
                1 << 20,
            );
            // One batch of `batch` changes, compressed again and again.
            let one = pack_one(&sample[..batch], enc);
            let mut times = Vec::with_capacity(runs);
            for _ in 0..runs {
                let t = Instant::now();
                std::hint::black_box(gzip(std::hint::black_box(&one)));
                times.push(t.elapsed().as_secs_f64() * 1e6);
            }
            println!(
                "{:<5} {:>6} {:>10.1} {:>10.1} {:>6.1}% {:>10.1} {:>10.1} {:>9.1}% {:>11.1}",
                format!("{enc:?}").to_lowercase(),
                batch,
                none.per_change(none.sent),
                zip.per_change(zip.sent),
                100.0 * zip.sent as f64 / none.sent as f64,
                none.per_change(none.wire),
                zip.per_change(zip.wire),
                100.0 * zip.wire as f64 / none.wire as f64,
                common::median(&times),
            );
        }
    }
    println!("\ndeflate levels on one 1,000-change batch (raw deflate bytes, median µs):");
    for enc in [Encoding::Json, Encoding::Cbor] {
        let one = pack_one(&sensor_sample(1000, 100), enc);
        let mut line = format!(
            "{:<5} {:>6} B:",
            format!("{enc:?}").to_lowercase(),
            one.len()
        );
        for level in [1u8, 3, 6, 9] {
            let mut times = Vec::with_capacity(runs);
            let mut len = 0;
            for _ in 0..runs {
                let t = Instant::now();
                len =
                    std::hint::black_box(miniz_oxide::deflate::compress_to_vec(&one, level)).len();
                times.push(t.elapsed().as_secs_f64() * 1e6);
            }
            line += &format!(
                "  level {level}: {len} ({:.1}%) {:.0} µs",
                100.0 * len as f64 / one.len() as f64,
                common::median(&times)
            );
        }
        println!("{line}");
    }
}

/// The uncompressed payload of one batch holding all of `changes`.
fn pack_one(changes: &[edgesync::usage::Queued], enc: Encoding) -> Vec<u8> {
    edgesync::usage::batch_payload(changes, enc, "pump-0042")
}
