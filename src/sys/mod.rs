//! Layer 1: the process and its operating system, below every feature: systemd notify
//! and watchdog primitives, crash points and fatal-error handling (test hooks in debug
//! builds), the one atomic file writer and the running log filter.

pub mod atomic_file;
pub mod crash;
pub mod fatal;
pub mod log;
pub mod notify;
