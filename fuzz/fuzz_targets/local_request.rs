//! The local socket's request parsing (NDJSON): the line reader over a byte stream cut
//! into arbitrary chunks, the request decoder, and the checks done before any store access
//! (changes of a `report`, key globs of a `watch`).
#![no_main]

use std::sync::OnceLock;

use edgesync::model::glob::KeyGlob;
use edgesync::local_api::{self, Line};
use libfuzzer_sys::fuzz_target;
use tokio::io::BufReader;
use tokio::runtime::Runtime;

fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    })
}

fn check_line(line: &[u8]) {
    let req = match local_api::decode_line(line) {
        Ok(r) => r,
        Err(answer) => {
            let v: serde_json::Value = serde_json::from_str(&answer).expect("answer is JSON");
            assert_eq!(v["ok"], false);
            return;
        }
    };
    match req.op.as_str() {
        "report" => {
            for c in req.changes.unwrap_or_default() {
                if let Ok(c) = c.validate() {
                    edgesync::change::validate_key(&c.key).expect("validated key");
                    let back = edgesync::change::decode_value(&c.value).expect("value decodes");
                    let _ = back;
                }
            }
        }
        "watch" => {
            for k in req.keys.unwrap_or_default() {
                if let Ok(g) = KeyGlob::new(&k) {
                    assert!(g.matches(&k), "a glob matches its own text");
                    if let Some(key) = &req.key {
                        let _ = g.matches(key);
                    }
                }
            }
        }
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    // The first byte sets the reader's buffer size, so lines straddle chunk boundaries.
    let Some((&cap, stream)) = data.split_first() else {
        return;
    };
    let mut reader = BufReader::with_capacity(usize::from(cap % 64) + 1, stream);
    let mut expected = stream.split(|&b| b == b'\n').peekable();
    let mut buf = Vec::new();
    loop {
        let got = runtime()
            .block_on(local_api::read_line(&mut reader, &mut buf))
            .expect("reading from memory");
        match got {
            Line::Eof => {
                // Only an empty tail after the last newline is left.
                assert!(expected.all(|l| l.is_empty()));
                break;
            }
            Line::TooLong => panic!("no line here is over MAX_LINE"),
            Line::Ok => {
                assert_eq!(Some(buf.as_slice()), expected.next());
                // The server skips blank lines.
                if !buf.iter().all(u8::is_ascii_whitespace) {
                    check_line(&buf);
                }
            }
        }
    }
});
