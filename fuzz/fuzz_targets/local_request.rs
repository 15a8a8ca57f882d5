//! The local socket's request parsing (NDJSON): the line reader over a byte stream cut
//! into arbitrary chunks, the request decoder, and the checks done before any store access
//! (changes of a `report`, key globs of a `watch`).
#![no_main]

use std::sync::OnceLock;

use edgesync::Request;
use edgesync::codec::socket::{self as local_api, Line};
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
    // A request serializes to a line that parses back to the same request (compared as
    // lines: a change's note of a wide integer is not sent).
    let again = req.to_line().expect("a request serializes");
    let back = Request::parse(again.as_bytes()).expect("its line parses");
    assert_eq!(back.to_line().expect("a request serializes"), again);
    match req {
        Request::Report { changes } => {
            assert!(!changes.is_empty(), "a report has changes");
            for c in changes {
                if let Ok(c) = c.validate() {
                    edgesync::validate_key(&c.key).expect("validated key");
                    let back = edgesync::decode_value(&c.value).expect("value decodes");
                    let _ = back;
                }
            }
        }
        Request::Watch { keys } => {
            assert!(!keys.is_empty(), "a watch has globs");
            // Any `key` of the line, matched against each glob (`watch` ignores it).
            let line: serde_json::Value = serde_json::from_slice(line).expect("parsed JSON");
            let key = line.get("key").and_then(serde_json::Value::as_str);
            for g in keys {
                assert!(g.matches(g.as_str()), "a glob matches its own text");
                if let Some(key) = key {
                    let _ = g.matches(key);
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
