//! `rollback`: `{"key": K, "version": V}` applies the value `K` had at version `V` again,
//! through its handler (as `edgesync rollback K V`); recorded in history with origin
//! `rollback` and reported. Answers `{"key", "version", "value", "status": "applied"}`;
//! `failed` when the version is not in the key's history or the handler fails.

use serde_json::Value;

use super::Services;
use super::request::Args;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollback {
    pub key: String,
    pub version: u64,
}

impl Rollback {
    pub fn parse(args: &mut Args) -> Result<Self, String> {
        let key = args.str("key")?;
        let version = args.u64("version")?;
        let key = key.ok_or_else(|| args.missing("key", "the key to roll back"))?;
        let version =
            version.ok_or_else(|| args.missing("version", "the desired version to apply again"))?;
        crate::model::change::validate_key(&key).map_err(|e| format!("rollback: args.key: {e}"))?;
        Ok(Self { key, version })
    }

    pub async fn run(&self, svc: &Services) -> Result<Value, String> {
        svc.applier
            .rollback(&self.key, self.version)
            .await
            .map_err(|e| e.to_string())
    }
}
