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
//! - [`status`]: the status document.
//! - [`agent`]: wiring and shutdown of the daemon.

pub mod agent;
pub mod change;
pub mod client;
pub mod codec;
pub mod config;
pub mod desired;
pub mod link;
pub mod local_api;
pub mod status;
pub mod store;
pub mod sync;
pub mod topics;
