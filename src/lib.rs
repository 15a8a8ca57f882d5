//! edgesync: a lightweight IoT edge sync agent.
//!
//! # Data flow
//! ```text
//! local program ─► local_api (Unix socket, NDJSON) ─► store::Outbox (redb, group commit, fsync)
//!      ▲ CLI (client)                                   seq → change, bounded
//!                                                        │
//!                              sync engine ◄─────────────┘ (reads oldest first; acks delete)
//! ```
//!
//! # Layers
//! A module may use only modules of lower layers and its own folder; `tests/architecture.rs`
//! reads this table and fails on any other `crate::` path (and on any cycle).
//!
//! | layer | modules | what |
//! | --- | --- | --- |
//! | 0 | `model` | a change and its key and value rules, topics, key globs, desired value rules, payload encodings and the document codec, command names, text helpers |
//! | 1 | `sys` | systemd notify and watchdog primitives, crash points and test hooks, the fatal hook, the one atomic file writer, the log filter |
//! | 2 | `config` | the TOML file, validated into typed section values |
//! | 3 | `store` | the durable, bounded outbox, the latest reported state, the desired-state tables and the result outbox |
//! | 4 | `desired` | applying desired documents: plans, conflicts, handlers, watchers |
//! | 5 | `health` | the status board, the status document and the metrics |
//! | 6 | `reload` | the running config and its reload |
//! | 7 | `control` | commands over MQTT (`P/D/cmd/NAME`), with exactly-once effects |
//! | 8 | `link`, `local_api` | the MQTT session (engine, backoff, batch codec, TLS, the cloud profile); the Unix socket (protocol, server, the CLI's client, queue inspection) |
//! | 9 | `agent` | wiring, shutdown and supervision (systemd status and watchdog) of the daemon |

pub mod agent;
pub mod config;
pub mod control;
pub mod desired;
pub mod health;
pub mod link;
pub mod local_api;
pub mod model;
pub mod reload;
pub mod store;
pub mod sys;

// Old paths, kept for the binary, tests, benches and fuzz targets until the facade.
pub use health::{metrics, status};
pub use link as sync;
pub use link::codec;
pub use local_api::{client, inspect};
pub use model::{change, topics};
pub use sys::{atomic_file, crash, fatal, notify};
