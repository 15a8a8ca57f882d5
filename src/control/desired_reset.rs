//! `desired-reset`: `{"confirm": true, "version": N}` sets the highest accepted (and the
//! applied) desired version back to `N` (default 0), so that documents above `N` apply
//! again. The way out after the cloud sent a version it cannot exceed (e.g. u64::MAX by a
//! bug): every later document is `stale` until then. The desired state, its history and the
//! queue stay as they are. Destructive: answered `forbidden` unless `[control] allow` lists
//! it, `bad-request` without `confirm: true`, `failed` while a document is being applied or
//! when `N` is not below the current version. Answers `{"version": N, "was": old}`.

use serde_json::{Value, json};

use super::Services;
use super::request::Args;
use crate::store::desired as dstore;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredReset {
    pub version: u64,
}

impl DesiredReset {
    pub fn parse(args: &mut Args) -> Result<Self, String> {
        let confirm = args.bool("confirm")?;
        let version = args.u64("version")?.unwrap_or(0);
        if confirm != Some(true) {
            return Err(
                "desired-reset lets desired versions that were stale apply again: send args \
                 {\"confirm\": true} (and \"version\": N to restart above N, default 0) to \
                 confirm"
                    .into(),
            );
        }
        Ok(Self { version })
    }

    pub async fn run(&self, svc: &Services) -> Result<Value, String> {
        let was = dstore::reset_version(&svc.outbox, self.version)
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        tracing::warn!(
            was,
            version = self.version,
            "desired version reset by a command: later documents above it apply"
        );
        Ok(json!({"version": self.version, "was": was}))
    }
}
