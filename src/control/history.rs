//! `history`: `{"key": K, "limit": N}` → `{"key": K, "history": [{version, value, ts,
//! origin}, ...]}`, newest first, at most `limit` entries (default 10).

use serde_json::{Value, json};

use super::Services;
use super::request::Args;

/// Entries returned when `limit` is not given.
pub const DEFAULT_LIMIT: u64 = 10;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    pub key: String,
    pub limit: u64,
}

impl History {
    pub fn parse(args: &mut Args) -> Result<Self, String> {
        let key = args.str("key")?;
        let limit = args.u64("limit")?.unwrap_or(DEFAULT_LIMIT);
        let key = key.ok_or_else(|| args.missing("key", "the key whose values to show"))?;
        crate::model::change::validate_key(&key).map_err(|e| format!("history: args.key: {e}"))?;
        Ok(Self { key, limit })
    }

    pub async fn run(&self, svc: &Services) -> Result<Value, String> {
        let outbox = svc.outbox.clone();
        let key = self.key.clone();
        let mut h =
            tokio::task::spawn_blocking(move || crate::store::desired::history(&outbox, &key))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        h.reverse();
        h.truncate(usize::try_from(self.limit).unwrap_or(usize::MAX));
        Ok(json!({"key": self.key, "history": h}))
    }
}
