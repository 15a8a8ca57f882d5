//! The desired-document decoder on JSON input (first non-whitespace byte `{`).
#![no_main]

use edgesync::Encoding;
use edgesync::codec::doc;
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    if doc::sniff(data) != Encoding::Json {
        return;
    }
    common::check_decode(data);
});
