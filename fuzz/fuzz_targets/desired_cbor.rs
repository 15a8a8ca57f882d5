//! The desired-document decoder on CBOR input (anything not starting with `{`).
#![no_main]

use edgesync::Encoding;
use edgesync::codec::doc;
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    if doc::sniff(data) != Encoding::Cbor {
        return;
    }
    common::check_decode(data);
});
