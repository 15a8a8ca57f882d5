//! Batch compression (`sync.compression`, docs/PROTOCOL.md §5.1): a compressed batch is one
//! gzip member (RFC 1952) holding the JSON or CBOR batch.
//!
//! Gzip rather than a frame of our own: its first bytes, `1f 8b 08` (magic, then the codec:
//! 8 = deflate), tell it apart from JSON (`{`) and CBOR maps (`a0`-`bf`); `0x1f` starts
//! neither valid JSON text nor valid CBOR. And every back end can read it without our code
//! (`gzip -dc`, Python's `gzip.decompress`, Go's `compress/gzip`, Java's `GZIPInputStream`).
//! The agent only compresses: it never receives a compressed batch.

/// `sync.compression`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// `"none"`: batches as they are.
    #[default]
    None,
    /// `"gzip"`: deflate in a gzip member, when that makes the batch smaller.
    Gzip,
}

impl Compression {
    pub const NAMES: [&'static str; 2] = ["none", "gzip"];

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "none" => Some(Compression::None),
            "gzip" => Some(Compression::Gzip),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
        }
    }

    /// The payload to send for `batch`: compressed when configured and smaller, else
    /// `batch` itself. Never longer than `batch`, so a batch's byte limit holds on the wire.
    pub fn apply(self, batch: Vec<u8>) -> Vec<u8> {
        match self {
            Compression::None => batch,
            Compression::Gzip => {
                let z = gzip(&batch);
                if z.len() < batch.len() { z } else { batch }
            }
        }
    }
}

/// The first bytes of every compressed batch: the gzip magic and its codec, deflate.
pub const GZIP_MAGIC: [u8; 3] = [0x1f, 0x8b, 0x08];

/// Bytes gzip adds around the deflate stream (10 of header, 8 of trailer).
pub const GZIP_OVERHEAD: usize = 18;

/// Deflate level: 6 (zlib's default) takes a 1,000-change numeric batch to 10.7 % (JSON) /
/// 17.2 % (CBOR) in ~1.4 ms on x86 (docs/BENCHMARKS.md, "Compression"); 9 gains at most 0.2
/// points for 2-4 times the time, 1 loses 7-8 points.
const LEVEL: u8 = 6;

/// True when `payload` is a compressed batch (by its first bytes).
pub fn is_compressed(payload: &[u8]) -> bool {
    payload.starts_with(&GZIP_MAGIC)
}

/// `data` as one gzip member: no name, no time (the same batch gives the same bytes).
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let deflated = miniz_oxide::deflate::compress_to_vec(data, LEVEL);
    let mut out = Vec::with_capacity(deflated.len() + GZIP_OVERHEAD);
    // magic, CM = deflate, FLG = 0, MTIME = 0, XFL = 0, OS = 255 (unknown)
    out.extend_from_slice(&GZIP_MAGIC);
    out.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0xff]);
    out.extend_from_slice(&deflated);
    out.extend_from_slice(&crc32(data).to_le_bytes());
    // ISIZE: the length modulo 2^32 (RFC 1952).
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

/// CRC-32 (IEEE 802.3, reflected, as gzip and zlib's `crc32`), by a 1 KiB table built at
/// compile time.
fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c = CRC_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

const CRC_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// Test side of the frame: what a back end does (strict: one member, flags 0, CRC and size
/// checked).
#[cfg(test)]
pub fn gunzip(payload: &[u8]) -> Result<Vec<u8>, String> {
    if payload.len() < GZIP_OVERHEAD || !is_compressed(payload) {
        return Err("not a gzip member".into());
    }
    if payload[3] != 0 {
        return Err("unexpected gzip flags".into());
    }
    let (body, trailer) = payload[10..].split_at(payload.len() - 10 - 8);
    let data = miniz_oxide::inflate::decompress_to_vec(body).map_err(|e| format!("{e:?}"))?;
    let crc = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
    let size = u32::from_le_bytes([trailer[4], trailer[5], trailer[6], trailer[7]]);
    if crc != crc32(&data) || size != data.len() as u32 {
        return Err("CRC or size mismatch".into());
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_is_the_standard_one() {
        // The CRC-32 check value (the "123456789" test vector).
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn gzip_round_trips_and_is_deterministic() {
        for data in [
            &b""[..],
            b"x",
            &[0u8; 100_000],
            "{\"device\":\"d\",\"changes\":[]}".repeat(500).as_bytes(),
        ] {
            let z = gzip(data);
            assert!(is_compressed(&z));
            assert_eq!(&z[..10], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff]);
            assert_eq!(gunzip(&z).unwrap(), data);
            assert_eq!(gzip(data), z, "same input, same bytes");
        }
    }

    #[test]
    fn apply_never_makes_a_payload_longer() {
        let tiny = b"{\"device\":\"d\",\"changes\":[{\"seq\":1}]}".to_vec();
        assert_eq!(Compression::Gzip.apply(tiny.clone()), tiny);
        let big = tiny.repeat(50);
        let z = Compression::Gzip.apply(big.clone());
        assert!(is_compressed(&z) && z.len() < big.len() / 5);
        assert_eq!(gunzip(&z).unwrap(), big);
        // Incompressible bytes stay as they are.
        let mut x = 0x9e37_79b9_u32;
        let noise: Vec<u8> = (0..70_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        assert_eq!(Compression::Gzip.apply(noise.clone()), noise);
        assert_eq!(Compression::None.apply(big.clone()), big);
    }

    #[test]
    fn names_parse_back() {
        for n in Compression::NAMES {
            assert_eq!(Compression::parse(n).map(Compression::name), Some(n));
        }
        assert_eq!(Compression::parse("deflate"), None);
    }
}
