//! The config parser: TOML text to a validated `Config`, or a list of problems. The error
//! report (line and column of a syntax error, suggestions) is rendered too.
//!
//! The file sits in a directory that does not exist, so relative paths in the input never
//! resolve to real files.
#![no_main]

use std::path::Path;

use edgesync::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/nonexistent-edgesync-fuzz/edgesync.toml");
    match Config::from_toml_str(path, text) {
        Ok(config) => {
            let _ = format!("{config:?}");
        }
        Err(errors) => {
            let report = errors.to_string();
            assert!(!report.is_empty());
        }
    }
});
