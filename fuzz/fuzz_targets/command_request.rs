//! The command request decoder (`P/D/cmd/NAME`, CBOR or JSON) and the argument parsers of
//! every command, as `Controller::receive` uses them; responses must stay within
//! `MAX_RESPONSE_BYTES` in both encodings.
#![no_main]

use edgesync::Encoding;
use edgesync::codec::command::{self as request, MAX_ID_CHARS, MAX_RESPONSE_BYTES};
use edgesync::codec::command::{Command, CommandName, ErrorCode};
use edgesync::codec::doc;
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

fn fits(response: &Value) {
    for enc in [Encoding::Json, Encoding::Cbor] {
        let n = doc::encode(response, enc).len();
        assert!(n > 0, "response not encodable");
        assert!(n <= MAX_RESPONSE_BYTES, "response of {n} bytes in {enc:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the command the request is sent to.
    let Some((&pick, payload)) = data.split_first() else {
        return;
    };
    let encoding = doc::sniff(payload);
    let req = match request::parse(payload, encoding) {
        Ok(r) => r,
        Err(bad) => {
            if let Some(id) = &bad.id {
                assert!(!id.is_empty() && id.chars().count() <= MAX_ID_CHARS);
            }
            fits(&request::error(
                bad.id.as_deref(),
                ErrorCode::BadRequest,
                &bad.message,
            ));
            return;
        }
    };
    assert!(!req.id.is_empty() && req.id.chars().count() <= MAX_ID_CHARS);
    let names = CommandName::names();
    let name = names[usize::from(pick) % names.len()];
    let command = CommandName::parse(name).expect("a listed name parses");
    let response = match Command::parse(command, req.args.clone()) {
        Ok(_) => request::ok(&req.id, json!({})),
        Err(message) => request::error(Some(&req.id), ErrorCode::BadRequest, &message),
    };
    fits(&request::bounded(response, &req.id));
});
