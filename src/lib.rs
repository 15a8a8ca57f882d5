//! edgesync: a lightweight IoT edge sync agent.
//!
//! # Data flow
//! ```text
//! local program ─► local_api (Unix socket, NDJSON) ─► store::Outbox (redb, group commit, fsync)
//!      ▲ CLI (client)                                   seq → change, bounded
//! local MQTT broker ─► source (PUBACK once durable) ───► │ (the same append)
//!                              sync engine ◄─────────────┘ (reads oldest first; acks delete)
//! ```
//!
//! # Layers
//! A module may use only modules of lower layers and its own folder; `tests/architecture.rs`
//! reads this table and fails on any other `crate::` path (and on any cycle).
//!
//! | layer | modules | what |
//! | --- | --- | --- |
//! | 0 | `model` | a change and its key and value rules, topics, key globs, desired value rules, payload encodings and the document codec, batch compression, command names, text helpers |
//! | 1 | `sys` | systemd notify and watchdog primitives, crash points and test hooks, the fatal hook, the one atomic file writer, the log filter |
//! | 2 | `config` | the TOML file, validated into typed section values |
//! | 3 | `store` | the durable, bounded outbox, the latest reported state, the desired-state tables and the result outbox |
//! | 4 | `desired` | applying desired documents: plans, conflicts, handlers, watchers |
//! | 5 | `health` | the status board, the status document and the metrics |
//! | 6 | `reload` | the running config and its reload |
//! | 7 | `control` | commands over MQTT (`P/D/cmd/NAME`), with exactly-once effects |
//! | 8 | `link`, `local_api`, `source` | the MQTT session (engine, backoff, batch codec, TLS, the cloud profile); the Unix socket (protocol, server, the CLI's client, queue inspection); local MQTT sources (a subscription to a local broker, acknowledged once durable) |
//! | 9 | `agent` | wiring, shutdown and supervision (systemd status and watchdog) of the daemon |
//!
//! # Where new code goes
//! Where its types live: a wire vocabulary in `model`, a config key in `config` (with its
//! section type), a table in `store::tables`, a socket operation in `local_api::protocol`.
//! A cloud profile (AWS IoT Core, Azure IoT Hub) is a variant of `link::profile::Profile`:
//! the mapping between the agent's messages (change batches, results, presence, metrics;
//! desired documents, commands) and topics + payloads. The contract users read is
//! `docs/PROTOCOL.md`.

mod agent;
mod config;
mod control;
mod desired;
mod health;
mod link;
mod local_api;
mod model;
mod reload;
mod source;
mod store;
mod sys;

// # The facade
// The modules above are private; this is everything the binary (src/main.rs), the tests,
// the benches, examples/demo.rs and the fuzz targets use.

pub use agent::{AgentError, Handles, run, run_until};
pub use config::{
    Compression, Config, ConfigErrors, Encoding, WhenFull, client_timeout, parse_duration,
    resolve_path, socket_path,
};
pub use health::metrics::prometheus;
pub use health::status::{Status, render as render_status};
pub use local_api::client::{Client, ClientError, report_stream, report_stream_within};
pub use local_api::protocol::{Doc, Request};
pub use model::change::{
    NewChange, Origin, RawChange, decode_value, encode_value, now_ms, parse_assignment,
    validate_key,
};
pub use model::command::CommandName;
pub use model::glob::KeyGlob;
pub use model::text::human_duration;
pub use store::{
    ACK_SYNC, Ack, Appended, Outbox, RECORD_OVERHEAD, SEQ_RESERVE, StoreError, StoreOptions,
    journal_path,
};
pub use sys::fatal::install_hook;
pub use sys::log::{LogControl, check_log_level, for_stderr as log_for_stderr};

/// Crash points of debug builds: `EDGESYNC_CRASH_AT` kills the process at a named point.
pub mod crash {
    pub use crate::sys::crash::{ENV, point};
}

/// `edgesync queue`: read-only inspection of the outbox.
pub mod queue {
    pub use crate::local_api::inspect::{
        DEFAULT_PEEK, export_command, peek_command, stats_command,
    };
}

/// Data usage: batches packed with the real codec, bytes on the wire per change
/// (`edgesync estimate`, `benches/compress.rs`), and the compressed batch's frame.
pub mod usage {
    pub use crate::link::usage::*;
    pub use crate::model::compress::{GZIP_MAGIC, gzip, is_compressed};
    pub use crate::store::Queued;
}

/// The TLS client of the MQTT link and its error descriptions.
pub mod tls {
    pub use crate::link::tls::{DescribeCtx, client_config, describe};
}

/// Codecs and parsers of outside input, which the fuzz targets and tests drive directly.
pub mod codec {
    /// The desired document codec and payload encodings.
    pub mod doc {
        pub use crate::model::doc::*;
    }
    /// The outbox record codec.
    pub mod record {
        pub use crate::store::record::*;
    }
    /// Command requests (`P/D/cmd/NAME`) and their durable intake.
    pub mod command {
        pub use crate::control::request::*;
        pub use crate::control::store::{Incoming, Intake, Limits, receive};
        pub use crate::control::{Command, ErrorCode};
        pub use crate::model::command::CommandName;
    }
    /// The local socket's request lines.
    pub mod socket {
        pub use crate::local_api::protocol::*;
        pub use crate::local_api::{Line, MAX_LINE, decode_line, read_line};
    }
    /// The agent's topics.
    pub mod topics {
        pub use crate::model::topics::{Incoming, Topics};
    }
}
