//! `ping`: `{"pong": true, "ts": now}` (Unix ms). Takes no arguments.

use serde_json::{Value, json};

pub fn run() -> Value {
    json!({"pong": true, "ts": crate::model::change::now_ms()})
}
