//! `status`: the status document, as `edgesync status --json` prints it. Takes no arguments.

use serde_json::Value;

use super::Services;

pub async fn run(svc: &Services) -> Result<Value, String> {
    let svc = svc.clone();
    let status = tokio::task::spawn_blocking(move || {
        let mut s = crate::health::status::collect(&svc.identity, &svc.outbox, &svc.board);
        s.desired.version = crate::store::desired::applied_version(&svc.outbox)
            .ok()
            .flatten();
        s
    })
    .await
    .map_err(|e| e.to_string())?;
    serde_json::to_value(status).map_err(|e| e.to_string())
}
