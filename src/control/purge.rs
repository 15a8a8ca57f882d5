//! `purge`: `{"confirm": true}` drops every queued change (they are never sent; counted in
//! `dropped`). Destructive: answered `forbidden` unless `[control] allow` lists it, and
//! `bad-request` without `confirm: true`. Answers `{"dropped": n, "bytes": b}`.

use serde_json::{Value, json};

use super::Services;
use super::request::Args;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Purge;

impl Purge {
    pub fn parse(args: &mut Args) -> Result<Self, String> {
        match args.bool("confirm")? {
            Some(true) => Ok(Purge),
            _ => Err(
                "purge drops every queued change for good: send args {\"confirm\": true} to \
                 confirm"
                    .into(),
            ),
        }
    }

    pub async fn run(&self, svc: &Services) -> Result<Value, String> {
        let purged = svc.outbox.purge().await.map_err(|e| e.to_string())?;
        tracing::warn!(
            dropped = purged.changes,
            bytes = purged.bytes,
            "queue purged by a command"
        );
        Ok(json!({"dropped": purged.changes, "bytes": purged.bytes}))
    }
}
