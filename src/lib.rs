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
//! # Modules
//! - [`config`]: the TOML file, parsed raw then validated into typed values.
//! - [`change`]: key and value rules of a reported change.
//! - [`store`]: the durable, bounded outbox and the latest reported state.
//! - [`local_api`]: the socket server; [`client`]: its client, used by the CLI.
//! - [`status`]: the status document; [`metrics`]: the health figures (`P/D/metrics`,
//!   Prometheus text file); [`inspect`]: read-only queue inspection (`edgesync queue`).
//! - [`control`]: commands over MQTT (`P/D/cmd/NAME`), with exactly-once effects.
//! - [`agent`]: wiring and shutdown of the daemon.
//! - [`notify`]: systemd `Type=notify` (READY, STATUS, STOPPING) and the watchdog that pings
//!   only while the store writer and the link make progress.

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
