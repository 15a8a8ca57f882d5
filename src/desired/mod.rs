//! Desired state: versioned documents from the cloud, validated, checked for conflicts with
//! local changes, applied through handlers, recorded with per-key history.

pub mod apply;
pub mod handlers;
pub mod plan;
pub mod watch;
